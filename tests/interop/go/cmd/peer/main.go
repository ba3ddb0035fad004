// Command peer is the Go side of the ttrpc interop tests: it serves the Echo
// test service with containerd/ttrpc, or drives a ttrpc server that
// implements the same Echo semantics through a list of named cases.
//
//	peer server --listen unix:/abs/path.sock
//	peer client --dial unix:/abs/path.sock --case NAME|all
//	peer bench --dial unix:/abs/path.sock --kind unary|bidi --seconds N --concurrency C
//
// Only UNIX socket addresses are accepted.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/socketforward/socketforward/tests/interop/go/echopb"
	"github.com/socketforward/socketforward/tests/interop/go/internal/standin"
)

const (
	echoService = "socketforward.interop.v1.Echo"
	maxFrame    = 4 << 20 // ttrpc's maximum frame data length
	caseTimeout = 30 * time.Second
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = serverMain(os.Args[2:])
	case "client":
		err = clientMain(os.Args[2:])
	case "bench":
		err = benchMain(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "peer:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: peer server --listen unix:/abs/path.sock\n"+
		"       peer client --dial unix:/abs/path.sock --case NAME|all\n"+
		"       peer bench --dial unix:/abs/path.sock --kind unary|bidi --seconds N --concurrency C")
	os.Exit(2)
}

// ---------------------------------------------------------------- server

func serverMain(args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	listen := fs.String("listen", "", "unix:/abs/path.sock to listen on")
	_ = fs.Parse(args)
	path, err := standin.UnixPath(*listen)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	srv, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	echopb.RegisterEchoService(srv, echoServer{})

	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	defer os.Remove(path)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	fmt.Println("READY") // stdout is unbuffered in Go

	select {
	case <-ctx.Done():
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(shutdownCtx); err != nil {
			srv.Close()
		}
		return nil
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	}
}

type echoServer struct{}

// sortedMetadata returns the request's ttrpc metadata sorted by key, then value.
func sortedMetadata(ctx context.Context) []*echopb.Pair {
	md, _ := ttrpc.GetMetadata(ctx)
	var pairs []*echopb.Pair
	for k, vs := range md {
		for _, v := range vs {
			pairs = append(pairs, &echopb.Pair{Key: k, Value: v})
		}
	}
	slices.SortFunc(pairs, func(a, b *echopb.Pair) int {
		if c := strings.Compare(a.Key, b.Key); c != 0 {
			return c
		}
		return strings.Compare(a.Value, b.Value)
	})
	return pairs
}

func failure(req *echopb.EchoRequest) error {
	if req.FailCode == 0 {
		return nil
	}
	return status.Error(codes.Code(req.FailCode), req.FailMessage)
}

func (echoServer) Unary(ctx context.Context, req *echopb.EchoRequest) (*echopb.EchoResponse, error) {
	if req.SleepMs > 0 {
		t := time.NewTimer(time.Duration(req.SleepMs) * time.Millisecond)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			// FromContextError maps DeadlineExceeded/Canceled to their codes.
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if err := failure(req); err != nil {
		return nil, err
	}
	payload := req.Payload
	if req.ResponseSize > 0 {
		payload = bytes.Repeat([]byte{'x'}, int(req.ResponseSize))
	}
	return &echopb.EchoResponse{Payload: payload, Seq: 1, Metadata: sortedMetadata(ctx)}, nil
}

func (echoServer) ClientStream(ctx context.Context, s echopb.Echo_ClientStreamServer) (*echopb.EchoResponse, error) {
	var (
		payload []byte
		n       int32
		fail    error
	)
	for {
		req, err := s.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if n == 0 {
			fail = failure(req)
		}
		n++
		payload = append(payload, req.Payload...)
	}
	if fail != nil {
		return nil, fail
	}
	return &echopb.EchoResponse{Payload: payload, Seq: n, Metadata: sortedMetadata(ctx)}, nil
}

func (echoServer) ServerStream(ctx context.Context, req *echopb.EchoRequest, s echopb.Echo_ServerStreamServer) error {
	md := sortedMetadata(ctx)
	for i := int32(1); i <= req.Count; i++ {
		if err := s.Send(&echopb.EchoResponse{Payload: req.Payload, Seq: i, Metadata: md}); err != nil {
			return err
		}
	}
	return failure(req)
}

func (echoServer) Bidi(ctx context.Context, s echopb.Echo_BidiServer) error {
	md := sortedMetadata(ctx)
	for seq := int32(1); ; seq++ {
		req, err := s.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := failure(req); err != nil {
			return err
		}
		if err := s.Send(&echopb.EchoResponse{Payload: req.Payload, Seq: seq, Metadata: md}); err != nil {
			return err
		}
	}
}

// ---------------------------------------------------------------- client

// env is what a case gets: a fresh client on its own connection, the typed
// Echo client over it, and a way to dial further clients.
type env struct {
	c    *ttrpc.Client
	echo echopb.EchoClient
	dial func(opts ...ttrpc.ClientOpts) (*ttrpc.Client, error)
}

type testCase struct {
	name string
	run  func(ctx context.Context, e *env) error
}

var cases = []testCase{
	{"unary", caseUnary},
	{"metadata", caseMetadata},
	{"server_stream", caseServerStream},
	{"server_stream_empty", caseServerStreamEmpty},
	{"client_stream", caseClientStream},
	{"client_stream_none", caseClientStreamNone},
	{"bidi", caseBidi},
	{"bidi_1000", caseBidi1000},
	{"deadline", caseDeadline},
	{"unimplemented_service", caseUnimplementedService},
	{"unimplemented_method", caseUnimplementedMethod},
	{"error_codes", caseErrorCodes},
	{"server_stream_error", caseServerStreamError},
	{"max_frame", caseMaxFrame},
	{"oversize", caseOversize},
	{"concurrent_100", caseConcurrent100},
}

func clientMain(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	dial := fs.String("dial", "", "unix:/abs/path.sock to connect to")
	name := fs.String("case", "all", "case to run, or all")
	_ = fs.Parse(args)
	path, err := standin.UnixPath(*dial)
	if err != nil {
		return err
	}

	var selected []testCase
	for _, tc := range cases {
		if *name == "all" || *name == tc.name {
			selected = append(selected, tc)
		}
	}
	if len(selected) == 0 {
		var names []string
		for _, tc := range cases {
			names = append(names, tc.name)
		}
		return fmt.Errorf("unknown case %q; known: all %s", *name, strings.Join(names, " "))
	}

	failed := 0
	for _, tc := range selected {
		if err := runCase(path, tc); err != nil {
			fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", tc.name, err)
			failed++
			continue
		}
		fmt.Printf("PASS %s\n", tc.name)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d cases failed", failed, len(selected))
	}
	return nil
}

// runCase runs one case on a fresh connection, bounded by caseTimeout.
// The case context is cancelled, not given a deadline, so calls carry no
// timeout_nano unless a case asks for one.
func runCase(path string, tc testCase) error {
	dial := func(opts ...ttrpc.ClientOpts) (*ttrpc.Client, error) {
		conn, err := net.Dial("unix", path)
		if err != nil {
			return nil, err
		}
		return ttrpc.NewClient(conn, opts...), nil
	}
	c, err := dial()
	if err != nil {
		return err
	}
	defer c.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- tc.run(ctx, &env{c: c, echo: echopb.NewEchoClient(c), dial: dial}) }()
	select {
	case err := <-done:
		return err
	case <-time.After(caseTimeout):
		return fmt.Errorf("timed out after %v", caseTimeout)
	}
}

// checkResp compares a response with the expected payload and seq.
func checkResp(what string, r *echopb.EchoResponse, payload []byte, seq int32) error {
	if !bytes.Equal(r.Payload, payload) {
		return fmt.Errorf("%s: payload %s, want %s", what, short(r.Payload), short(payload))
	}
	if r.Seq != seq {
		return fmt.Errorf("%s: seq %d, want %d", what, r.Seq, seq)
	}
	return nil
}

func short(b []byte) string {
	if len(b) <= 40 {
		return fmt.Sprintf("%q", b)
	}
	return fmt.Sprintf("%q...(%d bytes)", b[:40], len(b))
}

// checkStatus checks that err is a status error with the given code and,
// when msg is not empty, message.
func checkStatus(what string, err error, code codes.Code, msg string) error {
	if err == nil {
		return fmt.Errorf("%s: no error, want %v", what, code)
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%s: error %q (%T) is not a status, want %v", what, err, err, code)
	}
	if st.Code() != code {
		return fmt.Errorf("%s: code %v (%q), want %v", what, st.Code(), st.Message(), code)
	}
	if msg != "" && st.Message() != msg {
		return fmt.Errorf("%s: message %q, want %q", what, st.Message(), msg)
	}
	return nil
}

// expectEOF checks that the next Recv ends the stream cleanly.
func expectEOF(what string, recv func() (*echopb.EchoResponse, error)) error {
	r, err := recv()
	if err == io.EOF {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: got error %v, want io.EOF", what, err)
	}
	return fmt.Errorf("%s: got extra message (payload %s seq %d), want io.EOF", what, short(r.Payload), r.Seq)
}

func caseUnary(ctx context.Context, e *env) error {
	r, err := e.echo.Unary(ctx, &echopb.EchoRequest{Payload: []byte("hello")})
	if err != nil {
		return err
	}
	if err := checkResp("unary", r, []byte("hello"), 1); err != nil {
		return err
	}
	if len(r.Metadata) != 0 {
		return fmt.Errorf("unary: metadata %v, want none", r.Metadata)
	}
	return nil
}

func caseMetadata(ctx context.Context, e *env) error {
	md := ttrpc.MD{}
	md.Append("k2", "c")
	md.Append("k1", "b", "a")
	r, err := e.echo.Unary(ttrpc.WithMetadata(ctx, md), &echopb.EchoRequest{Payload: []byte("md")})
	if err != nil {
		return err
	}
	if err := checkResp("metadata", r, []byte("md"), 1); err != nil {
		return err
	}
	want := [][2]string{{"k1", "a"}, {"k1", "b"}, {"k2", "c"}}
	var got [][2]string
	for _, p := range r.Metadata {
		got = append(got, [2]string{p.Key, p.Value})
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("metadata: echoed %v, want %v", got, want)
	}
	return nil
}

func caseServerStream(ctx context.Context, e *env) error {
	s, err := e.echo.ServerStream(ctx, &echopb.EchoRequest{Payload: []byte("ss"), Count: 5})
	if err != nil {
		return err
	}
	for i := int32(1); i <= 5; i++ {
		r, err := s.Recv()
		if err != nil {
			return fmt.Errorf("server_stream: message %d: %w", i, err)
		}
		if err := checkResp(fmt.Sprintf("server_stream message %d", i), r, []byte("ss"), i); err != nil {
			return err
		}
	}
	return expectEOF("server_stream end", s.Recv)
}

func caseServerStreamEmpty(ctx context.Context, e *env) error {
	s, err := e.echo.ServerStream(ctx, &echopb.EchoRequest{Payload: []byte("none"), Count: 0})
	if err != nil {
		return err
	}
	return expectEOF("server_stream_empty", s.Recv)
}

func caseClientStream(ctx context.Context, e *env) error {
	s, err := e.echo.ClientStream(ctx)
	if err != nil {
		return err
	}
	for _, p := range []string{"a", "b", "c"} {
		if err := s.Send(&echopb.EchoRequest{Payload: []byte(p)}); err != nil {
			return fmt.Errorf("client_stream: send %q: %w", p, err)
		}
	}
	r, err := s.CloseAndRecv()
	if err != nil {
		return fmt.Errorf("client_stream: %w", err)
	}
	return checkResp("client_stream", r, []byte("abc"), 3)
}

func caseClientStreamNone(ctx context.Context, e *env) error {
	s, err := e.echo.ClientStream(ctx)
	if err != nil {
		return err
	}
	r, err := s.CloseAndRecv()
	if err != nil {
		return fmt.Errorf("client_stream_none: %w", err)
	}
	return checkResp("client_stream_none", r, nil, 0)
}

func caseBidi(ctx context.Context, e *env) error {
	s, err := e.echo.Bidi(ctx)
	if err != nil {
		return err
	}
	for i := int32(1); i <= 5; i++ {
		p := []byte(fmt.Sprintf("bidi-%d", i))
		if err := s.Send(&echopb.EchoRequest{Payload: p}); err != nil {
			return fmt.Errorf("bidi: send %d: %w", i, err)
		}
		r, err := s.Recv()
		if err != nil {
			return fmt.Errorf("bidi: recv %d: %w", i, err)
		}
		if err := checkResp(fmt.Sprintf("bidi message %d", i), r, p, i); err != nil {
			return err
		}
	}
	if err := s.CloseSend(); err != nil {
		return fmt.Errorf("bidi: close send: %w", err)
	}
	return expectEOF("bidi end", s.Recv)
}

func caseBidi1000(ctx context.Context, e *env) error {
	const n = 1000
	s, err := e.echo.Bidi(ctx)
	if err != nil {
		return err
	}
	sendErr := make(chan error, 1)
	go func() {
		for i := 1; i <= n; i++ {
			if err := s.Send(&echopb.EchoRequest{Payload: []byte(fmt.Sprintf("m-%d", i))}); err != nil {
				sendErr <- fmt.Errorf("bidi_1000: send %d: %w", i, err)
				return
			}
		}
		sendErr <- s.CloseSend()
	}()
	for i := int32(1); i <= n; i++ {
		r, err := s.Recv()
		if err != nil {
			return fmt.Errorf("bidi_1000: recv %d: %w", i, err)
		}
		if err := checkResp(fmt.Sprintf("bidi_1000 message %d", i), r, []byte(fmt.Sprintf("m-%d", i)), i); err != nil {
			return err
		}
	}
	if err := <-sendErr; err != nil {
		return err
	}
	return expectEOF("bidi_1000 end", s.Recv)
}

func caseDeadline(ctx context.Context, e *env) error {
	// 1. A client context deadline: the Go client sends it as timeout_nano and
	// also gives up on its own when it passes, so either side may report it.
	dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := e.echo.Unary(dctx, &echopb.EchoRequest{Payload: []byte("late"), SleepMs: 5000})
	if took := time.Since(start); took >= 3*time.Second {
		return fmt.Errorf("deadline: call took %v, want < 3s", took)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		if err := checkStatus("deadline (client context)", err, codes.DeadlineExceeded, ""); err != nil {
			return err
		}
	}

	// 2. timeout_nano alone (no client deadline): the server must end the
	// call with DEADLINE_EXCEEDED by itself.
	c, err := e.dial(ttrpc.WithUnaryClientInterceptor(
		func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response,
			_ *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
			req.TimeoutNano = (200 * time.Millisecond).Nanoseconds()
			return invoker(ctx, req, resp)
		}))
	if err != nil {
		return err
	}
	defer c.Close()
	start = time.Now()
	_, err = echopb.NewEchoClient(c).Unary(ctx, &echopb.EchoRequest{Payload: []byte("late"), SleepMs: 5000})
	if took := time.Since(start); took >= 3*time.Second {
		return fmt.Errorf("deadline: server-side timeout took %v, want < 3s", took)
	}
	if err := checkStatus("deadline (timeout_nano)", err, codes.DeadlineExceeded, ""); err != nil {
		return err
	}

	// 3. The first client is still usable.
	r, err := e.echo.Unary(ctx, &echopb.EchoRequest{Payload: []byte("after")})
	if err != nil {
		return fmt.Errorf("deadline: unary after timeout: %w", err)
	}
	return checkResp("deadline: unary after timeout", r, []byte("after"), 1)
}

func caseUnimplementedService(ctx context.Context, e *env) error {
	err := e.c.Call(ctx, "no.such.Service", "Unary", &echopb.EchoRequest{}, &echopb.EchoResponse{})
	return checkStatus("unimplemented_service", err, codes.Unimplemented, "")
}

func caseUnimplementedMethod(ctx context.Context, e *env) error {
	err := e.c.Call(ctx, echoService, "Nope", &echopb.EchoRequest{}, &echopb.EchoResponse{})
	return checkStatus("unimplemented_method", err, codes.Unimplemented, "")
}

func caseErrorCodes(ctx context.Context, e *env) error {
	for code := codes.Canceled; code <= codes.Unauthenticated; code++ {
		msg := fmt.Sprintf("msg-%d", code)
		_, err := e.echo.Unary(ctx, &echopb.EchoRequest{FailCode: int32(code), FailMessage: msg})
		if err := checkStatus(fmt.Sprintf("error_codes %d", code), err, code, msg); err != nil {
			return err
		}
	}
	return nil
}

func caseServerStreamError(ctx context.Context, e *env) error {
	const msg = "stream failed"
	s, err := e.echo.ServerStream(ctx, &echopb.EchoRequest{
		Payload: []byte("e"), Count: 2, FailCode: int32(codes.FailedPrecondition), FailMessage: msg,
	})
	if err != nil {
		return err
	}
	for i := int32(1); i <= 2; i++ {
		r, err := s.Recv()
		if err != nil {
			return fmt.Errorf("server_stream_error: message %d: %w", i, err)
		}
		if err := checkResp(fmt.Sprintf("server_stream_error message %d", i), r, []byte("e"), i); err != nil {
			return err
		}
	}
	_, err = s.Recv()
	return checkStatus("server_stream_error end", err, codes.FailedPrecondition, msg)
}

// requestFrameSize is the size of the ttrpc Request frame the client sends
// for a unary Echo call with req (no metadata, no timeout).
func requestFrameSize(req *echopb.EchoRequest) int {
	payload, err := proto.Marshal(req)
	if err != nil {
		panic(err)
	}
	return proto.Size(&ttrpc.Request{Service: echoService, Method: "Unary", Payload: payload})
}

func caseMaxFrame(ctx context.Context, e *env) error {
	// Find the payload length that makes the Request frame exactly maxFrame.
	req := &echopb.EchoRequest{}
	n := maxFrame
	for {
		req.Payload = bytes.Repeat([]byte{'p'}, n)
		size := requestFrameSize(req)
		if size == maxFrame {
			break
		}
		n -= size - maxFrame
	}
	r, err := e.echo.Unary(ctx, req)
	if err != nil {
		return fmt.Errorf("max_frame: request frame of %d bytes: %w", maxFrame, err)
	}
	if err := checkResp("max_frame request", r, req.Payload, 1); err != nil {
		return err
	}

	const size = maxFrame - 64
	r, err = e.echo.Unary(ctx, &echopb.EchoRequest{ResponseSize: size})
	if err != nil {
		return fmt.Errorf("max_frame: response of %d payload bytes: %w", size, err)
	}
	return checkResp("max_frame response", r, bytes.Repeat([]byte{'x'}, size), 1)
}

func caseOversize(ctx context.Context, e *env) error {
	_, err := e.echo.Unary(ctx, &echopb.EchoRequest{Payload: make([]byte, maxFrame+1)})
	if err := checkStatus("oversize", err, codes.ResourceExhausted, ""); err != nil {
		return err
	}
	var oe *ttrpc.OversizedMessageErr
	if !errors.As(err, &oe) {
		return fmt.Errorf("oversize: error %v (%T) is not a local OversizedMessageErr", err, err)
	}
	r, err := e.echo.Unary(ctx, &echopb.EchoRequest{Payload: []byte("still ok")})
	if err != nil {
		return fmt.Errorf("oversize: unary after refusal: %w", err)
	}
	return checkResp("oversize: unary after refusal", r, []byte("still ok"), 1)
}

func caseConcurrent100(ctx context.Context, e *env) error {
	const n = 100
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := []byte(fmt.Sprintf("concurrent-%d", i))
			r, err := e.echo.Unary(ctx, &echopb.EchoRequest{Payload: p})
			if err != nil {
				errs[i] = fmt.Errorf("concurrent_100 call %d: %w", i, err)
				return
			}
			errs[i] = checkResp(fmt.Sprintf("concurrent_100 call %d", i), r, p, 1)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}
