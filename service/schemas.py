"""Request and response bodies (they also document the API in OpenAPI)."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = [
    "ErrorResponse", "ServerMetadata", "TensorMetadata", "ModelMetadata", "GroupElementOut",
    "Orientation", "ImagePrediction", "PredictResponse", "Base64Images",
]


class ErrorResponse(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """KServe v2 model metadata, plus what the card and the runtime say."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    state: str = Field(description="READY, LOADING, FAILED or UNLOADED")
    reason: str = ""
    execution_providers: list[str] = []
    labels: list[str] = []
    group: dict | None = None
    card: dict | None = None


class GroupElementOut(BaseModel):
    index: int
    angle: float = Field(description="rotation in degrees, counter-clockwise")
    reflection: bool


class Orientation(BaseModel):
    """Per-orientation responses of every class, one column per group element."""

    group: str
    elements: list[GroupElementOut]
    responses: dict[str, list[float]] = Field(description="label -> response at each group element, in element order")


class Features(BaseModel):
    """The spatially pooled last hidden layer: ``per_element[d][h]`` ([D, |H|], rotating the input
    permutes the columns) and its orientation-pooled, invariant mean ``invariant[d]`` ([D])."""

    invariant: list[float]
    per_element: list[list[float]]


class ImagePrediction(BaseModel):
    index: int
    filename: str | None = None
    label: str = Field(description="top class")
    score: float = Field(description="probability of the top class")
    probabilities: dict[str, float]
    orientation: Orientation
    dominant_orientation: float = Field(
        description="angle in degrees of the group element where the top class responds most"
    )
    dominant_element: GroupElementOut
    features: Features | None = Field(None, description="only with ?features=true, for models exported with features")



class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[ImagePrediction]


class Base64Images(BaseModel):
    """Images as base64 strings (data URLs accepted)."""

    images: list[str] = Field(min_length=1)
    filenames: list[str] | None = None
