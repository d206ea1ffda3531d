"""Region features: boxes, RoI pooling, pooled vectors."""
