"""`mlx-kto chat --web`: the chat as a local web page (starlette + uvicorn)."""
