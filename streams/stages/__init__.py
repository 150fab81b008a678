"""The pipeline's stages, one module each (docs/ARCHITECTURE.md, Stages and their topics).

Each module opens with the topics it reads and writes and registers its agent(s) on the
Faust app from a `PipelineContext` (`context.py`); the loop every agent shares — decode,
span, dead letter on failure, go on — is written once in `common.py`.
"""
