// Command nerdbox-host stands in for the host side of containerd/nerdbox's
// socket forwarding (its shim plus the libkrun VM instance) in the interop
// tests. nerdbox's Go module is not on the module proxy, so this program is
// written against containerd/ttrpc and the stubs generated from our copy of the
// SocketForward .proto; its wire behaviour follows nerdbox's sources:
//
//   - internal/vm/libkrun/instance.go (Start): remove a stale socket, listen on
//     the RPC socket, accept exactly ONE connection (the guest dials back),
//     within vmStartTimeout (15 s), then close the listener (which unlinks the
//     socket file, so a second dial-back finds nothing) and make a ttrpc
//     client on the accepted connection.
//   - internal/shim/task/socketforward.go (bindSockets, acceptLoop,
//     handleConnection, relay): one Bind with every forward, one Accept stream,
//     ConnectRequests handled one at a time in the stream's receive loop.
//   - internal/vm/libkrun/instance.go (StartStream): the data-stream handshake
//     and its retry loop.
//   - the shim's Go runtime: containerd's shim.setRuntime (vendored
//     containerd/v2 pkg/shim/shim.go) sets the GC target to 40% and frees
//     memory to the OS every 30 s; it keeps GOMAXPROCS from the environment,
//     where nerdbox's shim manager (pkg/shim/manager, newCommand) puts
//     GOMAXPROCS=4 when it starts the long-running shim.
//
// Line references are to containerd/nerdbox at commit d50bdab. What is NOT
// reproduced, and why it does not change the figures: the shim's per-connection
// log calls are logrus Debug entries, dropped at the default level (here
// nothing is logged per connection); the stream socket path is relative to the
// shim's working directory there (absolute here).
//
// Usage:
//
//	nerdbox-host --rpc-listen unix:/abs/rpc.sock --streams unix:/abs/streams.sock \
//	    --forward ID=HOST_PATH:VM_PATH [--forward ...] [--announce] [--accept-timeout 15s]
//
// READY is printed on stdout once Bind succeeded and the Accept stream is open.
// Logs go to stderr. SIGTERM/SIGINT: exit 0 (RPC socket file removed if it is
// still there). The Accept stream ending with an error: the error is printed
// and the exit status is 1 (the shim only logs it). Only UNIX sockets.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"

	"github.com/socketforward/socketforward/tests/interop/go/internal/standin"
	"github.com/socketforward/socketforward/tests/interop/go/sfpb"
)

// announceKey is OUR metadata extension (SPEC section 5); nerdbox's shim
// never sends it. Only with --announce.
const announceKey = "socketforward-forward-ids"

// forward is the shim's socketForwardEntry minus the container path.
type forward struct {
	id       string
	hostPath string
	vmPath   string
}

type forwardFlags []forward

func (f *forwardFlags) String() string { return fmt.Sprint(len(*f)) }

// Set parses ID=HOST_PATH:VM_PATH; VM_PATH is absolute, so the split is at
// the last ":/".
func (f *forwardFlags) Set(v string) error {
	id, rest, ok := strings.Cut(v, "=")
	i := strings.LastIndex(rest, ":/")
	if !ok || id == "" || i <= 0 {
		return fmt.Errorf("forward %q: want ID=HOST_PATH:VM_PATH", v)
	}
	*f = append(*f, forward{id: id, hostPath: rest[:i], vmPath: rest[i+1:]})
	return nil
}

func main() { standin.Main("nerdbox-host", run) }

// shimGCPercent and shimMaxProcs are the shim's runtime settings (see the
// package comment).
const (
	shimGCPercent = 40
	shimMaxProcs  = 4
)

// shimRuntime is setRuntime with the manager's environment: GC at 40%, memory
// handed back every 30 s, GOMAXPROCS from the environment or else 4.
func shimRuntime() {
	debug.SetGCPercent(shimGCPercent)
	go func() {
		for range time.Tick(30 * time.Second) {
			debug.FreeOSMemory()
		}
	}()
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(shimMaxProcs)
	}
	log.Printf("runtime as nerdbox's shim: GOMAXPROCS=%d GC=%d%%", runtime.GOMAXPROCS(0), shimGCPercent)
}

func run() error {
	var forwards forwardFlags
	rpcListen := flag.String("rpc-listen", "", "unix:/abs/rpc.sock the guest dials back to")
	streams := flag.String("streams", "", "unix:/abs/streams.sock where the guest listens for data streams")
	announce := flag.Bool("announce", false, "send the "+announceKey+" metadata on Accept (our extension, not nerdbox)")
	// instance.go: vmStartTimeout = 15 * time.Second ("VM did not connect within").
	acceptTimeout := flag.Duration("accept-timeout", 15*time.Second, "how long to wait for the guest's dial-back (0: forever)")
	flag.Var(&forwards, "forward", "ID=HOST_PATH:VM_PATH (repeatable)")
	flag.Parse()
	if flag.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %q", flag.Args())
	}
	rpcPath, err := standin.UnixPath(*rpcListen)
	if err != nil {
		return fmt.Errorf("--rpc-listen: %w", err)
	}
	streamPath, err := standin.UnixPath(*streams)
	if err != nil {
		return fmt.Errorf("--streams: %w", err)
	}
	if len(forwards) == 0 {
		return errors.New("at least one --forward is required")
	}
	shimRuntime()

	sigCtx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	conn, err := acceptDialBack(sigCtx, rpcPath, *acceptTimeout)
	if err != nil {
		if sigCtx.Err() != nil {
			return nil // terminated while waiting for the guest
		}
		return err
	}
	if *announce {
		ids := make([]string, len(forwards))
		for i, f := range forwards {
			ids[i] = f.id
		}
		conn = &announceConn{Conn: conn, value: strings.Join(ids, ",")}
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	sf := sfpb.NewSocketForwardClient(client)

	// socketforward.go bindSockets: one Bind with every (forward_id, vm_path).
	req := &sfpb.BindRequest{}
	for _, f := range forwards {
		req.Sockets = append(req.Sockets, &sfpb.Socket{ForwardId: f.id, SocketPath: f.vmPath})
	}
	if _, err := sf.Bind(sigCtx, req); err != nil {
		return fmt.Errorf("bind RPC: %w", err)
	}
	log.Printf("bound %d forward(s)", len(forwards))

	fwd := &forwarder{
		streamPath: streamPath,
		entries:    make(map[string]forward, len(forwards)),
		closeCh:    make(chan struct{}),
	}
	for _, f := range forwards {
		fwd.entries[f.id] = f
	}
	streamErr, err := fwd.startAccept(sf)
	if err != nil {
		return err
	}
	fmt.Println("READY") // stdout is unbuffered in Go

	for {
		select {
		case <-sigCtx.Done():
			log.Printf("terminated: shutting down")
			fwd.shutdown()
			return nil
		case err := <-streamErr:
			fwd.shutdown()
			return fmt.Errorf("socketforward: Accept stream error: %w", err)
		}
	}
}

// acceptDialBack is instance.go's Start: remove a stale socket (os.Remove,
// not-exist ignored), listen, accept a single connection within the timeout,
// then close the listener (`defer rpcListener.Close()`; Go unlinks the file).
func acceptDialBack(ctx context.Context, path string, timeout time.Duration) (net.Conn, error) {
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("failed to remove stale socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("failed to listen on socket: %w", err)
	}
	defer l.Close()
	log.Printf("listening on %s for the guest's dial-back (one connection)", path)

	type acceptResult struct {
		conn net.Conn
		err  error
	}
	acceptC := make(chan acceptResult, 1)
	go func() {
		conn, err := l.Accept()
		acceptC <- acceptResult{conn, err}
	}()
	var timeoutC <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		timeoutC = t.C
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-timeoutC:
		return nil, fmt.Errorf("VM did not connect within %s", timeout)
	case r := <-acceptC:
		if r.err != nil {
			return nil, fmt.Errorf("failed to accept connection from VM: %w", r.err)
		}
		log.Printf("VM connection established")
		return r.conn, nil
	}
}

// forwarder is the shim's socketForwarder for one container.
type forwarder struct {
	streamPath string
	entries    map[string]forward
	closeCh    chan struct{}
	closeOnce  sync.Once
}

func (fwd *forwarder) shutdown() {
	fwd.closeOnce.Do(func() { close(fwd.closeCh) })
}

// startAccept is acceptLoop: open the Accept stream, a sender goroutine fed
// by a 64-slot results channel, and a receive loop that handles each
// ConnectRequest synchronously before reading the next one. The returned
// channel reports a receive error other than io.EOF / context.Canceled (the
// shim logs those and stops reading; here the process exits non-zero).
func (fwd *forwarder) startAccept(sf sfpb.SocketForwardClient) (<-chan error, error) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-fwd.closeCh; cancel() }()

	stream, err := sf.Accept(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("socketforward: Accept RPC failed: %w", err)
	}
	log.Printf("Accept stream open")

	results := make(chan *sfpb.ConnectResult, 64)
	go func() {
		for {
			select {
			case r, ok := <-results:
				if !ok {
					return
				}
				if err := stream.Send(r); err != nil {
					log.Printf("socketforward: sending ConnectResult stream_id=%s: %v", r.StreamId, err)
				}
			case <-ctx.Done():
				return
			}
		}
	}()

	streamErr := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, context.Canceled) {
					log.Printf("socketforward: Accept stream error: %v", err)
					streamErr <- err
				} else {
					log.Printf("socketforward: Accept stream ended: %v", err)
				}
				return
			}
			select {
			case results <- fwd.handleConnection(ctx, req):
			case <-fwd.closeCh:
				return
			}
		}
	}()
	return streamErr, nil
}

// handleConnection: resolve forward_id locally; dial the host socket; open the
// data stream; start the relay; only then return the success result.
func (fwd *forwarder) handleConnection(ctx context.Context, req *sfpb.ConnectRequest) *sfpb.ConnectResult {
	entry, ok := fwd.entries[req.ForwardId]
	if !ok {
		log.Printf("socketforward: unknown forward ID from VM forward_id=%s stream_id=%s", req.ForwardId, req.StreamId)
		return &sfpb.ConnectResult{
			StreamId: req.StreamId,
			Error:    fmt.Sprintf("unknown forward ID: %s", req.ForwardId),
		}
	}

	hostConn, err := net.Dial("unix", entry.hostPath)
	if err != nil {
		log.Printf("socketforward: failed to dial host socket host_path=%s stream_id=%s: %v", entry.hostPath, req.StreamId, err)
		return &sfpb.ConnectResult{StreamId: req.StreamId, Error: "failed to dial host socket"}
	}

	vsockConn, err := startStream(ctx, fwd.streamPath, req.StreamId)
	if err != nil {
		log.Printf("socketforward: failed to open vsock stream stream_id=%s: %v", req.StreamId, err)
		hostConn.Close()
		return &sfpb.ConnectResult{StreamId: req.StreamId, Error: err.Error()}
	}

	go relay(hostConn, vsockConn, fwd.closeCh)

	return &sfpb.ConnectResult{StreamId: req.StreamId}
}

// startStream is instance.go's StartStream: while the stream socket does not
// exist, sleep 10 ms, 20 ms, ... (d += 10 ms while d < 1 s, about 49.5 s in
// all); once it exists, a single dial (a dial error is final), write the id
// as u32 big-endian length + bytes, read the ack length and allocate that many
// bytes (unbounded, as the reference does), and compare the ack to the id.
func startStream(ctx context.Context, streamPath, streamID string) (net.Conn, error) {
	const timeIncrement = 10 * time.Millisecond
	for d := timeIncrement; d < time.Second; d += timeIncrement {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		default:
		}
		if _, err := os.Stat(streamPath); err == nil {
			conn, err := net.Dial("unix", streamPath)
			if err != nil {
				return nil, fmt.Errorf("failed to connect to stream server: %w", err)
			}
			idBytes := []byte(streamID)
			if err := binary.Write(conn, binary.BigEndian, uint32(len(idBytes))); err != nil {
				conn.Close()
				return nil, fmt.Errorf("failed to write stream id length: %w", err)
			}
			if _, err := conn.Write(idBytes); err != nil {
				conn.Close()
				return nil, fmt.Errorf("failed to write stream id: %w", err)
			}
			var ackLen uint32
			if err := binary.Read(conn, binary.BigEndian, &ackLen); err != nil {
				conn.Close()
				return nil, fmt.Errorf("failed to read ack length: %w", err)
			}
			ackBytes := make([]byte, ackLen)
			if _, err := io.ReadFull(conn, ackBytes); err != nil {
				conn.Close()
				return nil, fmt.Errorf("failed to read ack: %w", err)
			}
			if ack := string(ackBytes); ack != streamID {
				conn.Close()
				return nil, fmt.Errorf("stream %q rejected by server: %s", streamID, ack)
			}
			return conn, nil
		}
		time.Sleep(d)
	}
	return nil, errors.New("timeout waiting for stream server: unavailable")
}

// relay is the shim's relay: io.Copy both ways; the first direction to finish
// (EOF or error) closes both connections, so a half-close is not propagated;
// shutdown also closes both.
func relay(a, b io.ReadWriteCloser, closeCh <-chan struct{}) {
	done := make(chan struct{}, 2)
	cp := func(dst io.Writer, src io.Reader) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	go func() {
		<-closeCh
		a.Close()
		b.Close()
	}()

	<-done
	a.Close()
	b.Close()
	<-done
}

// announceConn adds our metadata to the Accept request frame. The Go ttrpc
// client sends no metadata on streams (client.go NewStream: "TODO: metadata
// from context"), so the first Request frame for SocketForward/Accept is
// rewritten on its way out: metadata is appended to the ttrpc Request and the
// frame length fixed. Every other byte passes unchanged. ttrpc's channel
// writes each frame under its send lock and flushes it before returning, so
// buffering an incomplete frame never holds one back.
type announceConn struct {
	net.Conn
	value string

	mu   sync.Mutex
	buf  []byte
	done bool
}

const frameHeaderLen = 10

func (c *announceConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done && len(c.buf) == 0 {
		return c.Conn.Write(p)
	}
	c.buf = append(c.buf, p...)
	for !c.done && len(c.buf) >= frameHeaderLen {
		n := int(binary.BigEndian.Uint32(c.buf[:4]))
		if len(c.buf) < frameHeaderLen+n {
			break
		}
		out, rewritten := c.rewrite(c.buf[:frameHeaderLen+n])
		c.done = rewritten
		if _, err := c.Conn.Write(out); err != nil {
			return 0, err
		}
		c.buf = c.buf[frameHeaderLen+n:]
	}
	if c.done && len(c.buf) > 0 {
		if _, err := c.Conn.Write(c.buf); err != nil {
			return 0, err
		}
	}
	if len(c.buf) == 0 || c.done {
		c.buf = nil
	}
	return len(p), nil
}

func (c *announceConn) rewrite(frame []byte) ([]byte, bool) {
	const messageTypeRequest = 1
	if frame[8] != messageTypeRequest {
		return frame, false
	}
	var req ttrpc.Request
	if err := proto.Unmarshal(frame[frameHeaderLen:], &req); err != nil {
		return frame, false
	}
	if req.Service != standin.ServiceName || req.Method != "Accept" {
		return frame, false
	}
	req.Metadata = append(req.Metadata, &ttrpc.KeyValue{Key: announceKey, Value: c.value})
	data, err := proto.Marshal(&req)
	if err != nil {
		return frame, false
	}
	out := make([]byte, frameHeaderLen, frameHeaderLen+len(data))
	copy(out, frame[:frameHeaderLen])
	binary.BigEndian.PutUint32(out[:4], uint32(len(data)))
	log.Printf("announcing %s=%s on Accept", announceKey, c.value)
	return append(out, data...), true
}
