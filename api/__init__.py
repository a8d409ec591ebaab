"""The OpenAI-compatible HTTP front of the actor pipeline (starlette on uvicorn / uvloop)."""
