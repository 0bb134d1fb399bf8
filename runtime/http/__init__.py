"""The runtime's HTTP process; the only part of the runtime importing litestar, uvicorn, redis."""
