"""The front door: the HTTP API, resumable SSE streams, the read model and the web console."""

from api._projections import PROJECTIONS, Record
from api._projector import Projector, rebuild
from api._readmodel import ReadModel

__all__ = ["PROJECTIONS", "Projector", "ReadModel", "Record", "rebuild"]
