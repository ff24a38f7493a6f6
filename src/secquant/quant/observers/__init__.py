"""Calibration statistics: observers that propose activation ranges."""

from .base import Observer, Reservoir
from .clipping import MSEObserver, PercentileObserver
from .minmax import MinMaxObserver, MovingAverageMinMaxObserver

OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}

__all__ = ["Observer", "Reservoir", "MinMaxObserver", "MovingAverageMinMaxObserver",
           "PercentileObserver", "MSEObserver", "OBSERVERS"]
