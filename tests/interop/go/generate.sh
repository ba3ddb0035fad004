#!/usr/bin/env bash
# Regenerates the Go stubs used by the ttrpc interop peer:
#   echopb/ from ttrpc-asyncio/tests/echo/echo.proto (the ttrpc library's test service)
#   sfpb/   from proto/nerdbox/services/socketforward/v1/socketforward.proto
#
# Usage: generate.sh [OUT_ROOT]
#   OUT_ROOT defaults to this directory; the stubs land in OUT_ROOT/echopb and
#   OUT_ROOT/sfpb. The plugin versions are the `tool` entries of go.mod.
#   Set PYTHON to a Python with grpcio-tools to skip `uv run`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$here}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
gobin="$root/build/gobin"
module="github.com/socketforward/socketforward/tests/interop/go"

command -v go >/dev/null || { echo "generate.sh: go is not on PATH" >&2; exit 1; }

mkdir -p "$gobin"
(
	cd "$here"
	go build -o "$gobin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
	go build -o "$gobin/protoc-gen-go-ttrpc" github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc
)

if [[ -n "${PYTHON:-}" ]]; then
	python=("$PYTHON")
else
	python=(uv run --project "$root" --locked --all-extras python)
fi
protoc=("${python[@]}" -m grpc_tools.protoc)
# grpc_tools ships the google/protobuf/*.proto includes.
wkt="$(cd "$root" && "${python[@]}" -c \
	'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

rm -f "$out"/echopb/*.pb.go "$out"/sfpb/*.pb.go

gen() { # gen INCLUDE_DIR PROTO_FILE
	(cd "$root" && "${protoc[@]}" \
		-I "$1" -I "$wkt" \
		--plugin=protoc-gen-go="$gobin/protoc-gen-go" \
		--plugin=protoc-gen-go-ttrpc="$gobin/protoc-gen-go-ttrpc" \
		--go_out="$out" --go_opt=module="$module" \
		--go-ttrpc_out="$out" --go-ttrpc_opt=module="$module" \
		"$1/$2")
}

gen ttrpc-asyncio/tests/echo echo.proto
gen proto nerdbox/services/socketforward/v1/socketforward.proto
