"""cleanplate.serving: the REST gateway (:mod:`.app`), its settings (:mod:`.settings`), the engines behind it
(:mod:`.engines`), the removal flow with the quality gate (:mod:`.removal`) and the uvicorn runner
(:mod:`.server`)."""
