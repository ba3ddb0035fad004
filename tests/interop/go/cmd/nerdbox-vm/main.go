// Command nerdbox-vm stands in for the VM side of containerd/nerdbox's socket
// forwarding (vminitd's socket-forward and streaming plugins) in the interop
// tests. nerdbox's Go module is not on the module proxy, so this program is
// written against containerd/ttrpc and the stubs generated from our copy of the
// SocketForward .proto; its wire behaviour follows nerdbox's sources:
//
//   - pkg/vminit/initd/listener.go (dialBackListener) and initd.go
//     (newService): the RPC connection is dialed ONCE to the host and a ttrpc
//     server serves that single connection; nothing dials again when it drops.
//   - plugins/vminit/streaming/plugin.go (service.Run, Get): the data-stream
//     listener; handshakes one connection at a time in the accept loop.
//   - internal/vminit/socketforward/socketforward.go (Service): Bind, Accept,
//     the 64-slot notify queue, stream ids, relay.
//   - pkg/vminit/initd/initd.go (Run): runtime.GOMAXPROCS(2) once the
//     services are made.
//
// Line references below are to containerd/nerdbox at commit d50bdab9
// (socketforward.go last changed in f26bfdc). What is NOT reproduced, and why
// it does not change the figures: vminitd's ttrpc server chains an otelttrpc
// interceptor on unary calls (Bind only, once); its per-connection log calls
// are logrus Debug entries, dropped at the default level (here nothing is
// logged per connection).
//
// Usage:
//
//	nerdbox-vm --rpc-dial unix:/abs/rpc.sock --streams unix:/abs/streams.sock
//
// Only Bind and Accept are served: Unbind (our addition to the service) is
// answered UNIMPLEMENTED by ttrpc itself, as nerdbox's vminitd would. Call
// metadata (our socketforward-forward-ids routing hint) is ignored; the Accept
// metadata is only logged so tests can see what the host sent.
//
// READY is printed on stdout once the RPC connection is up and the stream
// listener exists. Logs go to stderr. SIGTERM/SIGINT: listeners closed (their
// socket files removed), registered streams closed, exit 0. Only UNIX sockets.
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/socketforward/socketforward/tests/interop/go/internal/standin"
	"github.com/socketforward/socketforward/tests/interop/go/sfpb"
)

func main() { standin.Main("nerdbox-vm", run) }

// vminitMaxProcs is vminitd's GOMAXPROCS (initd.go).
const vminitMaxProcs = 2

func run() error {
	rpcDial := flag.String("rpc-dial", "", "unix:/abs/rpc.sock the host listens on (dialed once)")
	streams := flag.String("streams", "", "unix:/abs/streams.sock to listen on for data streams")
	flag.Parse()
	if flag.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %q", flag.Args())
	}
	rpcPath, err := standin.UnixPath(*rpcDial)
	if err != nil {
		return fmt.Errorf("--rpc-dial: %w", err)
	}
	streamPath, err := standin.UnixPath(*streams)
	if err != nil {
		return fmt.Errorf("--streams: %w", err)
	}

	sigCtx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	// The streaming plugin listens first (the socket-forward plugin requires it).
	sl, err := net.Listen("unix", streamPath)
	if err != nil {
		return fmt.Errorf("failed to listen on %s: %w", streamPath, err)
	}
	registry := &streamRegistry{l: sl, streams: make(map[string]net.Conn)}
	go registry.run()

	svc := newService(registry)

	// initd.go Run: "runtime.GOMAXPROCS(2)" once the services exist, whatever
	// the environment says.
	runtime.GOMAXPROCS(vminitMaxProcs)
	log.Printf("runtime as nerdbox's vminitd: GOMAXPROCS=%d", vminitMaxProcs)

	// dialBackListener: a single dial, no retry.
	conn, err := net.Dial("unix", rpcPath)
	if err != nil {
		_ = registry.shutdown()
		return fmt.Errorf("failed to dial host %s: %w", rpcPath, err)
	}
	log.Printf("RPC connection to %s established", rpcPath)
	rpcClosed := make(chan struct{})
	l := newSingleConnListener(&notifyCloseConn{Conn: conn, closed: rpcClosed})

	srv, err := ttrpc.NewServer()
	if err != nil {
		_ = registry.shutdown()
		return err
	}
	svc.register(srv)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), l) }()
	fmt.Println("READY") // stdout is unbuffered in Go

	for {
		select {
		case <-rpcClosed:
			// vminitd stays up; its dialBackListener never dials again.
			log.Printf("RPC connection closed; not dialing again (as nerdbox's vminitd)")
			rpcClosed = nil
		case err := <-served:
			log.Printf("ttrpc server stopped: %v", err)
			served = nil
		case <-sigCtx.Done():
			log.Printf("terminated: shutting down")
			_ = l.Close()
			_ = srv.Close()
			if err := svc.shutdown(); err != nil {
				log.Printf("closing listeners: %v", err)
			}
			if err := registry.shutdown(); err != nil {
				log.Printf("closing stream service: %v", err)
			}
			return nil
		}
	}
}

// singleConnListener hands out one connection, then blocks until closed:
// dialBackListener with the dial done up front.
type singleConnListener struct {
	conn chan net.Conn
	done chan struct{}
	once sync.Once
	addr net.Addr
}

func newSingleConnListener(c net.Conn) *singleConnListener {
	l := &singleConnListener{conn: make(chan net.Conn, 1), done: make(chan struct{}), addr: c.LocalAddr()}
	l.conn <- c
	return l
}

func (l *singleConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conn:
		return c, nil
	default:
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *singleConnListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *singleConnListener) Addr() net.Addr { return l.addr }

// notifyCloseConn reports when the ttrpc server closes the RPC connection.
type notifyCloseConn struct {
	net.Conn
	closed chan struct{}
	once   sync.Once
}

func (c *notifyCloseConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// ------------------------------------------------------------ data streams

// streamRegistry is the streaming plugin's service.
type streamRegistry struct {
	mu      sync.Mutex
	l       net.Listener
	streams map[string]net.Conn
}

// run handshakes connections one at a time: read u32 big-endian length + id
// (the length is not bounded, as in the reference), reject a duplicate id
// with the text `stream "<id>" already exists` and close, else register the
// connection and echo the id back as the ack.
func (s *streamRegistry) run() {
	for {
		conn, err := s.l.Accept()
		if err != nil {
			return
		}
		var idLen uint32
		if err := binary.Read(conn, binary.BigEndian, &idLen); err != nil {
			log.Printf("failed to read stream ID length: %v", err)
			conn.Close()
			continue
		}
		idBytes := make([]byte, idLen)
		if _, err := io.ReadFull(conn, idBytes); err != nil {
			log.Printf("failed to read stream ID: %v", err)
			conn.Close()
			continue
		}
		streamID := string(idBytes)

		s.mu.Lock()
		if _, ok := s.streams[streamID]; ok {
			s.mu.Unlock()
			log.Printf("duplicate stream ID, rejecting stream_id=%s", streamID)
			_ = writeString(conn, fmt.Sprintf("stream %q already exists", streamID))
			conn.Close()
			continue
		}
		s.streams[streamID] = conn
		s.mu.Unlock()

		if err := writeString(conn, streamID); err != nil {
			s.mu.Lock()
			delete(s.streams, streamID)
			s.mu.Unlock()
			conn.Close()
			continue
		}
	}
}

func writeString(conn net.Conn, s string) error {
	b := []byte(s)
	if err := binary.Write(conn, binary.BigEndian, uint32(len(b))); err != nil {
		return err
	}
	_, err := conn.Write(b)
	return err
}

// get hands a registered stream out once (stream.Manager.Get).
func (s *streamRegistry) get(id string) (io.ReadWriteCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	conn, ok := s.streams[id]
	if !ok {
		return nil, fmt.Errorf("stream %q not found: not found", id)
	}
	delete(s.streams, id)
	return conn, nil
}

func (s *streamRegistry) shutdown() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, conn := range s.streams {
		if err := conn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("failed to close connection: %w", err))
		}
	}
	if err := s.l.Close(); err != nil {
		errs = append(errs, fmt.Errorf("failed to close listener: %w", err))
	}
	return errors.Join(errs...)
}

// ------------------------------------------------------------ SocketForward

type service struct {
	streams *streamRegistry

	mu        sync.Mutex
	listeners []net.Listener
	pending   map[string]chan error

	// notify: 64 slots, shared by every Accept stream; whichever stream's
	// loop reads first sends the request (socketforward.go:70, :78, :139-147).
	notify chan *sfpb.ConnectRequest
}

func newService(streams *streamRegistry) *service {
	return &service{
		streams: streams,
		pending: make(map[string]chan error),
		notify:  make(chan *sfpb.ConnectRequest, 64),
	}
}

// register serves Bind and Accept only, so Unbind gets ttrpc's own
// UNIMPLEMENTED ("method Unbind"), exactly as a server without it
// (api/services/socketforward/v1/socketforward_ttrpc.pb.go:38-59).
func (s *service) register(srv *ttrpc.Server) {
	srv.RegisterService(standin.ServiceName, &ttrpc.ServiceDesc{
		Methods: map[string]ttrpc.Method{
			"Bind": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
				var req sfpb.BindRequest
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return s.bindAll(ctx, &req)
			},
		},
		Streams: map[string]ttrpc.Stream{
			"Accept": {
				Handler: func(ctx context.Context, stream ttrpc.StreamServer) (interface{}, error) {
					return nil, s.accept(ctx, stream)
				},
				StreamingClient: true,
				StreamingServer: true,
			},
		},
	})
}

// generateStreamID: "{prefix}-{unix nanoseconds}-{4 random bytes, URL-safe
// base64 without padding}".
func generateStreamID(prefix string) (string, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generating stream ID: %w", err)
	}
	return fmt.Sprintf("%s-%d-%s", prefix, time.Now().UnixNano(), base64.RawURLEncoding.EncodeToString(b[:])), nil
}

// bindAll binds entries in order under the service lock and stops at the
// first failure; the listeners created before it stay (not all-or-nothing).
func (s *service) bindAll(_ context.Context, req *sfpb.BindRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sock := range req.Sockets {
		if err := s.bind(sock.ForwardId, sock.SocketPath); err != nil {
			return nil, fmt.Errorf("binding socket forward listener at %s: %w", sock.SocketPath, err)
		}
	}
	return &emptypb.Empty{}, nil
}

// bind: parent directories 0755, whatever is at the path removed (os.Remove:
// any file or an empty directory), then listen. Nothing is validated; the
// same path bound again replaces the file and keeps the old listener open.
func (s *service) bind(forwardID, socketPath string) error {
	if err := os.MkdirAll(filepath.Dir(socketPath), 0o755); err != nil {
		return fmt.Errorf("creating parent directory for %s: %w", socketPath, err)
	}
	if err := os.Remove(socketPath); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("removing stale socket file %s: %w", socketPath, err)
	}
	l, err := net.Listen("unix", socketPath)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", socketPath, err)
	}
	s.listeners = append(s.listeners, l)
	log.Printf("socketforward: listening for forwarded connections forward_id=%s socket_path=%s", forwardID, socketPath)
	go s.acceptLoop(context.Background(), l, forwardID)
	return nil
}

// accept: a goroutine routes ConnectResults to the pending connections (an
// unknown stream_id is logged and ignored; socketforward.go:115-137); the
// handler sends whatever it takes from the shared notify queue until a send
// fails (that request is lost: its connection waits forever) or the stream's
// context ends (socketforward.go:139-147). The host closing its send side only
// ends the result goroutine (ttrpc server.go:434-435 closes the receive side,
// the context lives on), so an old handler keeps taking requests from the
// queue while a newer one also does, though the host can no longer answer
// on it.
func (s *service) accept(ctx context.Context, stream ttrpc.StreamServer) error {
	md, _ := ttrpc.GetMetadata(ctx)
	log.Printf("socketforward: Accept started (metadata ignored: %v)", map[string][]string(md))
	go func() {
		for {
			var result sfpb.ConnectResult
			if err := stream.RecvMsg(&result); err != nil {
				return
			}
			s.mu.Lock()
			ch, ok := s.pending[result.StreamId]
			if ok {
				delete(s.pending, result.StreamId)
			}
			s.mu.Unlock()
			if !ok {
				log.Printf("socketforward: ConnectResult for unknown stream, ignoring stream_id=%s", result.StreamId)
				continue
			}
			var dialErr error
			if result.Error != "" {
				dialErr = errors.New(result.Error)
			}
			ch <- dialErr
		}
	}()

	for {
		select {
		case req := <-s.notify:
			if err := stream.SendMsg(req); err != nil {
				log.Printf("socketforward: Accept send failed stream_id=%s: %v", req.StreamId, err)
				return err
			}
		case <-ctx.Done():
			log.Printf("socketforward: Accept ended: %v", ctx.Err())
			return ctx.Err()
		}
	}
}

func (s *service) acceptLoop(ctx context.Context, l net.Listener, forwardID string) {
	for {
		conn, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Printf("socketforward: accept error: %v", err)
			}
			return
		}
		go s.handleConnection(ctx, conn, forwardID)
	}
}

// handleConnection: new stream id, register as pending, try to queue the
// ConnectRequest without blocking (queue full: drop, close the connection;
// socketforward.go:216-228), wait for the result with no timeout (ctx is the
// context.Background() of socketforward.go:177; :231-240), on an error close
// at once, else claim the data stream and relay.
func (s *service) handleConnection(ctx context.Context, udsConn net.Conn, forwardID string) {
	streamID, err := generateStreamID("socketfwd")
	if err != nil {
		log.Printf("socketforward: generating stream ID: %v", err)
		udsConn.Close()
		return
	}

	resultCh := make(chan error, 1)
	s.mu.Lock()
	s.pending[streamID] = resultCh
	s.mu.Unlock()

	req := &sfpb.ConnectRequest{StreamId: streamID, ForwardId: forwardID}
	select {
	case s.notify <- req:
	default:
		s.mu.Lock()
		delete(s.pending, streamID)
		s.mu.Unlock()
		log.Printf("socketforward: notify channel full, dropping connection stream_id=%s forward_id=%s", streamID, forwardID)
		udsConn.Close()
		return
	}

	var dialErr error
	select {
	case dialErr = <-resultCh:
	case <-ctx.Done():
		s.mu.Lock()
		delete(s.pending, streamID)
		s.mu.Unlock()
		udsConn.Close()
		return
	}

	if dialErr != nil {
		log.Printf("socketforward: host failed to dial target socket stream_id=%s forward_id=%s: %v", streamID, forwardID, dialErr)
		udsConn.Close()
		return
	}

	vsockConn, err := s.streams.get(streamID)
	if err != nil {
		log.Printf("socketforward: vsock stream not found after successful ConnectResult stream_id=%s: %v", streamID, err)
		udsConn.Close()
		return
	}

	relay(ctx, udsConn, vsockConn)
}

// relay: io.Copy both ways; the first direction to finish closes both.
func relay(ctx context.Context, a, b io.ReadWriteCloser) {
	done := make(chan struct{}, 2)
	cp := func(dst io.Writer, src io.Reader) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	select {
	case <-done:
	case <-ctx.Done():
	}
	a.Close()
	b.Close()
	<-done
}

// shutdown closes every listener (Go unlinks their socket files); active
// relays are not touched (the process exit ends them).
func (s *service) shutdown() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, l := range s.listeners {
		if err := l.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.listeners = nil
	return errors.Join(errs...)
}
