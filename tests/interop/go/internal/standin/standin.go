// Package standin holds what the interop programs (peer, nerdbox-host,
// nerdbox-vm) share: address parsing, the service name, the main wrapper.
package standin

import (
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"
)

// ServiceName is the SocketForward service's full protobuf name, as nerdbox
// registers and calls it.
const ServiceName = "nerdbox.services.socketforward.v1.SocketForward"

// UnixPath parses "unix:/abs/path" and refuses anything else.
func UnixPath(addr string) (string, error) {
	p, ok := strings.CutPrefix(addr, "unix:")
	if !ok || !filepath.IsAbs(p) {
		return "", fmt.Errorf("address %q: want unix:/absolute/path", addr)
	}
	return p, nil
}

// Main logs with the program's name as the prefix, runs run and exits 1,
// printing the error, when it fails.
func Main(name string, run func() error) {
	log.SetPrefix(name + ": ")
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		os.Exit(1)
	}
}
