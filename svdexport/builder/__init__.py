"""Build time: calibration, the memory estimate and the engine build (above runtime/, whose loop calibration drives)."""
