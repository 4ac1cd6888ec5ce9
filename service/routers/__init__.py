"""One router module per resource: health and server metadata, models, inference, images, metrics."""
