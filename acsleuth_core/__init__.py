"""ACsleuth: anomalous cells in single-cell RNA-seq, batch correction around them, anomaly subtypes.

Importing the package asks Intel MKL (torch's CPU linear algebra on x86) for results that do not depend
on the number of threads (``MKL_CBWR=AUTO,STRICT``), so the same seed gives the same model and the same
calls on any machine. MKL reads the setting at its first matrix product: import ``acsleuth_core`` before
computing anything with torch, or set the variable before starting Python. A value set by the user is kept.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
