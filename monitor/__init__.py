"""Training-health monitor: metrics (metrics.py, spectral.py), the spike guard
(guard.py) and the HealthMonitor that runs them inside a training loop."""

from monitor.guard import Decision, SpikeGuard
from monitor.monitor import HealthMonitor
