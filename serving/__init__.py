"""cleanplate.serving: the REST gateway alone: routes, the pure-ASGI Guard and problem+json errors (:mod:`.app`),
its settings (:mod:`.settings`), Prometheus metrics (:mod:`.metrics`) and the uvicorn runner with a graceful
drain (:mod:`.server`). The engines (:mod:`cleanplate.engines`) and the gated removal (:mod:`cleanplate.removal`)
live in the core, which never imports this package."""
