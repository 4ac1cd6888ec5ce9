"""GSA-Serve inference service: ONNX Runtime sessions behind FastAPI.

Serves every model of a model repository (``models/<name>/<version>/model.onnx`` + ``card.json``)
over the Open Inference Protocol (KServe v2) and over image endpoints for people. Imports neither
torch nor ``training``.
"""

__version__ = "0.1.0"
