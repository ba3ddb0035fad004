"""The Echo test service: echo.proto, its generated messages and stubs
(``make proto``), a Python server (:mod:`.service`) and pytest fixtures
(:mod:`.fixtures`). The repository's Go and Rust interop peers serve the same
proto."""
