"""Model settings small enough for tests: a detector that trains on the demo in seconds."""

from acsleuth_core.detect import DetectorConfig
from acsleuth_core.mmd import PredictorConfig

#: a few epochs of a narrow module I: enough to exercise a whole pipeline stage, not to be accurate
DEMO_DETECTOR = DetectorConfig(
    epochs=5, latent_dim=16, hidden_dims=(32,), memory_size=64, batch_size=64,
    predictor=PredictorConfig(warmup_epochs=2, epochs=3),
)
