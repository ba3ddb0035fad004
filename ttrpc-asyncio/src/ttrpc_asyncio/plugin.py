"""protoc plugin ``protoc-gen-python_ttrpc``: typed ttrpc stubs per service.

For each service it writes ``<Service>Base`` (subclass it and override the
methods you serve; the rest answer UNIMPLEMENTED) and ``<Service>Stub`` (a
typed client). Parameters, comma-separated (``--python_ttrpc_out=k=v,k=v:DIR``
or ``--python_ttrpc_opt=k=v``):

``module=<package>``
    the Python package the ``_pb2`` modules of the files being generated live in.
``runtime=<module>``
    the ttrpc runtime the stubs import, bound to the name ``ttrpc``; default
    ``ttrpc_asyncio`` (``import ttrpc_asyncio as ttrpc``). Use it when this
    library is vendored under another name, e.g. ``runtime=myapp.vendor.ttrpc``
    gives ``from myapp.vendor import ttrpc``.
"""

from __future__ import annotations

import re
import sys

from google.protobuf.compiler import plugin_pb2
from google.protobuf.descriptor_pb2 import FileDescriptorProto, MethodDescriptorProto

DEFAULT_RUNTIME = "ttrpc_asyncio"
_PARAMETERS = frozenset({"module", "runtime"})
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def runtime_import(runtime: str) -> str:
    """The import line that binds the ttrpc runtime module ``runtime`` to ``ttrpc``."""
    parent, _, name = runtime.rpartition(".")
    alias = "" if name == "ttrpc" else " as ttrpc"
    return f"from {parent} import {name}{alias}" if parent else f"import {name}{alias}"


def _python_name(proto_file: str) -> str:
    """``proto_file`` as protoc's python generator names its module, before the
    ``_pb2``: ``-`` becomes ``_`` and ``/`` a dot (``github.com/a/my-api.proto``
    -> ``github.com.a.my_api``, which it writes to ``github/com/a/my_api_pb2.py``)."""
    return proto_file.removesuffix(".proto").replace("-", "_").replace("/", ".")


def _module_of(proto_file: str, local_files: set[str], package: str | None) -> str:
    """The Python module protoc's python generator gives ``proto_file``."""
    module = _python_name(proto_file) + "_pb2"
    if proto_file in local_files and package:
        return f"{package}.{module.rpartition('.')[2]}"
    return module


class _Types:
    """Maps fully-qualified message names to ``module.Name`` expressions."""

    def __init__(self, request: plugin_pb2.CodeGeneratorRequest, package: str | None) -> None:
        local = set(request.file_to_generate)
        self.names: dict[str, tuple[str, str]] = {}
        for proto in request.proto_file:
            module = _module_of(proto.name, local, package)
            prefix = f".{proto.package}." if proto.package else "."
            for message in proto.message_type:
                self.names[prefix + message.name] = (module, message.name)

    def ref(self, full_name: str, used: set[str]) -> str:
        module, name = self.names[full_name]
        used.add(module)
        return f"{module}.{name}"


def _kind(method: MethodDescriptorProto) -> str:
    return {
        (False, False): "unary",
        (False, True): "server_streaming",
        (True, False): "client_streaming",
        (True, True): "bidi",
    }[(method.client_streaming, method.server_streaming)]


def _render(proto: FileDescriptorProto, types: _Types, own_module: str, runtime: str) -> str:
    used: set[str] = {own_module}
    body: list[str] = []
    for service in proto.service:
        full = f"{proto.package}.{service.name}" if proto.package else service.name
        base = [
            f"class {service.name}Base:",
            f'    """Server side of ``{full}``: override the methods you serve."""',
            "",
            f'    SERVICE_NAME: typing.ClassVar[str] = "{full}"',
            "    SERVICE_DESCRIPTOR: typing.ClassVar[_descriptor.ServiceDescriptor] = (",
            f'        {own_module}.DESCRIPTOR.services_by_name["{service.name}"]',
            "    )",
        ]
        stub = [
            f"class {service.name}Stub:",
            f'    """Typed client of ``{full}``."""',
            "",
            f'    SERVICE_NAME: typing.ClassVar[str] = "{full}"',
            "",
            "    def __init__(self, client: ttrpc.Client) -> None:",
            "        self._client = client",
        ]
        for method in service.method:
            req = types.ref(method.input_type, used)
            resp = types.ref(method.output_type, used)
            name = method.name
            not_impl = f'        raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, "method {name}")'
            kind = _kind(method)
            base.append("")
            if kind == "unary":
                base += [
                    f"    async def {name}(self, request: {req}, context: ttrpc.CallContext)"
                    f" -> {resp}:",
                    not_impl,
                ]
                stub += [
                    "",
                    f"    async def {name}(",
                    f"        self, request: {req}, *, timeout: float | None = None,",
                    "        metadata: ttrpc.MetadataLike | None = None,",
                    f"    ) -> {resp}:",
                    "        return await self._client.unary(",
                    f'            self.SERVICE_NAME, "{name}", request, {resp},',
                    "            timeout=timeout, metadata=metadata,",
                    "        )",
                ]
                continue
            if kind == "server_streaming":
                base += [
                    f"    async def {name}(",
                    f"        self, request: {req}, stream: ttrpc.ServerStream[{req}, {resp}]",
                    "    ) -> None:",
                    not_impl,
                ]
            else:
                returns = resp if kind == "client_streaming" else "None"
                base += [
                    f"    async def {name}(self, stream: ttrpc.ServerStream[{req}, {resp}])"
                    f" -> {returns}:",
                    not_impl,
                ]
            request_arg = f"request: {req}, *, " if kind == "server_streaming" else "*, "
            stub += [
                "",
                f"    async def {name}(",
                f"        self, {request_arg}metadata: ttrpc.MetadataLike | None = None",
                f"    ) -> ttrpc.ClientStream[{req}, {resp}]:",
                "        return await self._client.stream(",
                f'            self.SERVICE_NAME, "{name}", {resp},',
                f"            client_streaming={method.client_streaming},",
                f"            server_streaming={method.server_streaming},",
                f"            request={'request' if kind == 'server_streaming' else 'None'},",
                "            metadata=metadata,",
                "        )",
            ]
        body += ["", "", *base, "", "", *stub]
    header = [
        f"# Generated by protoc-gen-python_ttrpc from {proto.name}. DO NOT EDIT.",
        f'"""ttrpc stubs for ``{proto.package}``."""',
        "",
        "from __future__ import annotations",
        "",
        "import typing",
        "",
        "from google.protobuf import descriptor as _descriptor",
        "",
        *(f"import {module}" for module in sorted(used)),
        runtime_import(runtime),
    ]
    return "\n".join(header + body) + "\n"


def _parameters(parameter: str) -> dict[str, str]:
    """``k=v,k=v`` as a dict; ValueError names a parameter this plugin does not know."""
    params = dict(item.split("=", 1) for item in parameter.split(",") if "=" in item)
    unknown = sorted(set(params) - _PARAMETERS)
    if unknown:
        raise ValueError(f"unknown parameter {', '.join(unknown)} (known: module, runtime)")
    runtime = params.get("runtime", DEFAULT_RUNTIME)
    if not _DOTTED_NAME.fullmatch(runtime):
        raise ValueError(f"runtime={runtime!r} is not a Python module name")
    return params


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse()
    response.supported_features = plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    try:
        params = _parameters(request.parameter)
    except ValueError as exc:
        # protoc prints this and fails the run, naming the plugin.
        response.error = str(exc)
        return response
    package = params.get("module")
    runtime = params.get("runtime", DEFAULT_RUNTIME)
    types = _Types(request, package)
    by_name = {proto.name: proto for proto in request.proto_file}
    for name in request.file_to_generate:
        proto = by_name[name]
        if not proto.service:
            continue
        own = _module_of(name, set(request.file_to_generate), package)
        out = response.file.add()
        # Beside the _pb2 module, where protoc's python generator writes it.
        out.name = _python_name(name).replace(".", "/") + "_ttrpc.py"
        out.content = _render(proto, types, own, runtime)
    return response


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
