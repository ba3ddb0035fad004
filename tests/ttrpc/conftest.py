from tests.ttrpc_fixtures import client, echo_server

__all__ = ["client", "echo_server"]
