// Command sfload is the forward benchmark's load generator and target service
// (bench/forward_bench.py --load go --target go, through bench/goload.py).
// The Python ones (bench/loadgen.py, bench/target.py) add interpreter time to
// every operation, which every benchmarked path then carries; this one times
// plain system calls, so its DIRECT figures are what the sockets cost.
//
// The wire protocol is bench/target.py's, so either target serves either
// load. The first byte 'U' + u64 size (big-endian): the target reads exactly
// that many bytes and answers the count as a u64; 'D' + u64 size: it sends
// that many bytes, then closes; anything else: it echoes until EOF. No
// workload needs a half-close (nerdbox's relay tears a connection down at the
// first EOF): each reads its answer, then closes.
//
// Usage:
//
//	sfload target PATH                               serve; "ready" on stdout once listening
//	sfload upload   -path P -size BYTES              one connection, count checked
//	sfload download -path P -size BYTES              one connection, count checked
//	sfload rtt      -path P -count N [-warmup 200]   1-byte round trips on one connection
//	sfload ttfb     -path P -count N [-warmup 20]    new connection, 1 byte there and back
//	sfload conns    -path P -seconds S -workers W    loops of connect, one echo, close
//	sfload burst    -path P -count N -bound S        N connects at once, answers within S
//
// Each workload prints one JSON object on stdout; a failure prints
// {"workload": ..., "error": ...} and exits 1. Standard library only.
package main

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	upload   = 'U'
	download = 'D'
	echo     = 'x'
	// block is the size of one bulk write, as bench/target.py's BLOCK.
	block = 1 << 20
	// headerSize is the mode byte and the u64 size.
	headerSize = 9
	// ioTimeout bounds a stalled sequential workload, as bench/loadgen.py's
	// connect(timeout=30).
	ioTimeout = 30 * time.Second
	// answerGrace is how long the connection-rate run waits for answers
	// past its end, as bench/loadgen.py's.
	answerGrace = 10 * time.Second
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: sfload target PATH | upload|download|rtt|ttfb|conns|burst -path PATH ...")
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	if cmd == "target" {
		if len(args) != 1 {
			fmt.Fprintln(os.Stderr, "usage: sfload target PATH")
			os.Exit(2)
		}
		if err := serve(args[0]); err != nil {
			fmt.Fprintln(os.Stderr, "sfload target:", err)
			os.Exit(1)
		}
		return
	}
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	path := fs.String("path", "", "UNIX socket to load")
	size := fs.Int64("size", 0, "bytes to send or receive (upload, download)")
	count := fs.Int("count", 0, "samples (rtt, ttfb) or connects (burst)")
	warmup := fs.Int("warmup", -1, "unrecorded samples first (default: rtt 200, ttfb 20)")
	seconds := fs.Float64("seconds", 1, "how long to open new connections (conns)")
	workers := fs.Int("workers", 32, "concurrent loops (conns)")
	bound := fs.Float64("bound", 5, "seconds to wait for the answers (burst)")
	_ = fs.Parse(args)
	if *path == "" {
		fail(cmd, errors.New("-path is required"))
	}
	var result any
	var err error
	switch cmd {
	case "upload":
		result, err = runUpload(*path, *size)
	case "download":
		result, err = runDownload(*path, *size)
	case "rtt":
		result, err = runRoundTrips(*path, *count, orDefault(*warmup, 200))
	case "ttfb":
		result, err = runFirstBytes(*path, *count, orDefault(*warmup, 20))
	case "conns":
		result, err = runConns(*path, *seconds, *workers)
	case "burst":
		result, err = runBurst(*path, *count, *bound)
	default:
		fmt.Fprintln(os.Stderr, "sfload: unknown command", cmd)
		os.Exit(2)
	}
	if err != nil {
		fail(cmd, err)
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}

func orDefault(v, def int) int {
	if v < 0 {
		return def
	}
	return v
}

func fail(workload string, err error) {
	out, _ := json.Marshal(map[string]string{"workload": workload, "error": err.Error()})
	fmt.Println(string(out))
	os.Exit(1)
}

func randomBlock() []byte {
	b := make([]byte, block)
	_, _ = rand.Read(b) // never fails on Linux (getrandom)
	return b
}

func header(mode byte, size int64) []byte {
	h := make([]byte, headerSize)
	h[0] = mode
	binary.BigEndian.PutUint64(h[1:], uint64(size))
	return h
}

// -- the target service -----------------------------------------------------

// bigBufs are the upload counter's receive buffers, shared over time: one MiB
// per connection would be most of the service's memory under a burst.
var bigBufs = sync.Pool{New: func() any { b := make([]byte, block); return &b }}

func serve(path string) error {
	// A stale socket file from a killed run, as asyncio's create_unix_server.
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		_ = os.Remove(path)
	}
	// The backlog is the kernel's somaxconn (4096 by default), which also
	// caps bench/target.py's backlog=4096.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		_ = ln.Close() // unlinks the socket file
		os.Exit(0)
	}()
	data := randomBlock()
	fmt.Println("ready")
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// EMFILE and the like under a burst: the backlog keeps the
			// rest waiting, so wait a little rather than spin or quit.
			time.Sleep(5 * time.Millisecond)
			continue
		}
		go serveConn(c, data)
	}
}

func serveConn(c *net.UnixConn, data []byte) {
	defer func() { _ = c.Close() }()
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if n == 0 {
		return
	}
	if buf[0] != upload && buf[0] != download {
		echoUntilEOF(c, buf, n, err)
		return
	}
	for n < headerSize {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil && n < headerSize {
			return
		}
	}
	size := int64(binary.BigEndian.Uint64(buf[1:headerSize]))
	if buf[0] == download {
		for left := size; left > 0; {
			k := min(left, int64(len(data)))
			if _, err := c.Write(data[:k]); err != nil {
				return
			}
			left -= k
		}
		return
	}
	count := int64(n - headerSize)
	big := bigBufs.Get().(*[]byte)
	defer bigBufs.Put(big)
	for count < size {
		m, err := c.Read(*big)
		count += int64(m)
		if err != nil && count < size {
			return
		}
	}
	var answer [8]byte
	binary.BigEndian.PutUint64(answer[:], uint64(count))
	if _, err := c.Write(answer[:]); err != nil {
		return
	}
	// The client closes once it has its answer.
	for {
		if _, err := c.Read(*big); err != nil {
			return
		}
	}
}

func echoUntilEOF(c *net.UnixConn, buf []byte, n int, err error) {
	for {
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
		n, err = c.Read(buf)
	}
}

// -- sequential workloads: blocking sockets ---------------------------------

// progress counts the sequential workloads' steps, for the watchdog: with
// blocking sockets there are no per-call deadlines, whose setsockopt calls
// would land in the timed part of each new connection.
var progress atomic.Uint64

func watchdog(workload string) {
	go func() {
		last, since := progress.Load(), time.Now()
		for range time.Tick(time.Second) {
			if p := progress.Load(); p != last {
				last, since = p, time.Now()
			} else if time.Since(since) > ioTimeout {
				fail(workload, fmt.Errorf("no progress for %s", ioTimeout))
			}
		}
	}()
}

// dial connects a blocking socket, so that each read and write below is one
// system call, with no goroutine parking and netpoller wakeup in the timed
// part.
func dial(path string) (int, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	for {
		err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: path})
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		_ = syscall.Close(fd)
		return -1, fmt.Errorf("connect %s: %w", path, err)
	}
	return fd, nil
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := syscall.Write(fd, b)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return os.NewSyscallError("write", err)
		}
		b = b[n:]
	}
	return nil
}

// readSome is one read; io.EOF when the peer closed.
func readSome(fd int, b []byte) (int, error) {
	for {
		n, err := syscall.Read(fd, b)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return 0, os.NewSyscallError("read", err)
		}
		if n == 0 {
			return 0, io.EOF
		}
		return n, nil
	}
}

func readFull(fd int, b []byte) error {
	for got := 0; got < len(b); {
		n, err := readSome(fd, b[got:])
		if err != nil {
			return fmt.Errorf("after %d of %d bytes: %w", got, len(b), err)
		}
		got += n
	}
	return nil
}

type transfer struct {
	Workload string  `json:"workload"`
	Bytes    int64   `json:"bytes"`
	Seconds  float64 `json:"seconds"`
}

func runUpload(path string, size int64) (*transfer, error) {
	watchdog("upload")
	data := randomBlock()
	t0 := time.Now()
	fd, err := dial(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = syscall.Close(fd) }()
	if err := writeAll(fd, header(upload, size)); err != nil {
		return nil, err
	}
	for left := size; left > 0; {
		k := min(left, int64(len(data)))
		if err := writeAll(fd, data[:k]); err != nil {
			return nil, err
		}
		left -= k
		progress.Add(1)
	}
	var answer [8]byte
	if err := readFull(fd, answer[:]); err != nil {
		return nil, fmt.Errorf("the count: %w", err)
	}
	elapsed := time.Since(t0).Seconds()
	if got := int64(binary.BigEndian.Uint64(answer[:])); got != size {
		return nil, fmt.Errorf("%s: service counted %d bytes, sent %d", path, got, size)
	}
	return &transfer{"upload", size, elapsed}, nil
}

func runDownload(path string, size int64) (*transfer, error) {
	watchdog("download")
	buf := make([]byte, block)
	t0 := time.Now()
	fd, err := dial(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = syscall.Close(fd) }()
	if err := writeAll(fd, header(download, size)); err != nil {
		return nil, err
	}
	var got int64
	for got < size {
		n, err := readSome(fd, buf)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		got += int64(n)
		progress.Add(1)
	}
	elapsed := time.Since(t0).Seconds()
	if got != size {
		return nil, fmt.Errorf("%s: received %d bytes, expected %d", path, got, size)
	}
	return &transfer{"download", size, elapsed}, nil
}

type latencies struct {
	Workload string    `json:"workload"`
	Count    int       `json:"count"`
	P50      float64   `json:"p50_us"`
	P99      float64   `json:"p99_us"`
	Samples  []float64 `json:"samples_us"` // sorted, microseconds
}

// percentile is bench/stats.py's rule: the sample at floor(p * n).
func percentile(sorted []float64, p float64) float64 {
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}

func newLatencies(workload string, samples []float64) *latencies {
	slices.Sort(samples)
	return &latencies{workload, len(samples), percentile(samples, 0.5), percentile(samples, 0.99), samples}
}

func runRoundTrips(path string, count, warmup int) (*latencies, error) {
	if count < 1 {
		return nil, errors.New("-count must be at least 1")
	}
	watchdog("rtt")
	fd, err := dial(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = syscall.Close(fd) }()
	out, in := []byte{echo}, make([]byte, 1)
	samples := make([]float64, 0, count)
	for i := range count + warmup {
		t0 := time.Now()
		if err := writeAll(fd, out); err != nil {
			return nil, err
		}
		if err := readFull(fd, in); err != nil {
			return nil, fmt.Errorf("%s: echo lost: %w", path, err)
		}
		d := time.Since(t0)
		if in[0] != echo {
			return nil, fmt.Errorf("%s: echo answered %q", path, in[0])
		}
		if i >= warmup {
			samples = append(samples, float64(d.Nanoseconds())/1000)
		}
		progress.Add(1)
	}
	return newLatencies("rtt", samples), nil
}

// firstByte is one sample of the ttfb workload: connect, send one byte, read
// it back, so a forwarder's per-connection setup shows on its own.
func firstByte(path string, in []byte) (time.Duration, error) {
	t0 := time.Now()
	fd, err := dial(path)
	if err != nil {
		return 0, err
	}
	defer func() { _ = syscall.Close(fd) }()
	if err := writeAll(fd, []byte{echo}); err != nil {
		return 0, err
	}
	if err := readFull(fd, in); err != nil {
		return 0, fmt.Errorf("%s: no first byte: %w", path, err)
	}
	d := time.Since(t0)
	if in[0] != echo {
		return 0, fmt.Errorf("%s: echo answered %q", path, in[0])
	}
	return d, nil
}

func runFirstBytes(path string, count, warmup int) (*latencies, error) {
	if count < 1 {
		return nil, errors.New("-count must be at least 1")
	}
	watchdog("ttfb")
	in := make([]byte, 1)
	samples := make([]float64, 0, count)
	for i := range count + warmup {
		d, err := firstByte(path, in)
		if err != nil {
			return nil, err
		}
		if i >= warmup {
			samples = append(samples, float64(d.Nanoseconds())/1000)
		}
		progress.Add(1)
	}
	return newLatencies("ttfb", samples), nil
}

// -- many connections at once: one epoll loop ----------------------------------

// echoes are connections that sent their one byte, watched by one epoll for
// the echo. One thread and raw system calls, as bench/loadgen.py's _Echoes:
// with a goroutine and a net.Conn per connection the load managed fewer
// connections per second than the Python one (25,000 against 33,000).
type echoes struct {
	addr   syscall.SockaddrUnix
	ep     int
	open   int // watched connections
	events []syscall.EpollEvent
	in     []byte
}

// errSendFailed is what open returns when the connect worked and the send did not.
var errSendFailed = errors.New("connected, but the send failed")

func newEchoes(path string) (*echoes, error) {
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	return &echoes{addr: syscall.SockaddrUnix{Name: path}, ep: ep, events: make([]syscall.EpollEvent, 256), in: make([]byte, 1)}, nil
}

// add connects (non-blocking: a UNIX listener with a full backlog answers
// EAGAIN at once) and sends the byte; nil once the connection is watched,
// else the connect's errno or errSendFailed.
func (e *echoes) add() error {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return os.NewSyscallError("socket", err)
	}
	if err := syscall.Connect(fd, &e.addr); err != nil {
		_ = syscall.Close(fd)
		return err
	}
	if n, err := syscall.Write(fd, []byte{echo}); n != 1 || err != nil {
		_ = syscall.Close(fd)
		return errSendFailed
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(fd)}
	if err := syscall.EpollCtl(e.ep, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		_ = syscall.Close(fd)
		return os.NewSyscallError("epoll_ctl", err)
	}
	e.open++
	return nil
}

// answers waits up to timeout for connections to become readable, reads each
// one's answer, closes it (which also takes it off the epoll) and reports
// whether it echoed the byte.
func (e *echoes) answers(timeout time.Duration, each func(ok bool)) error {
	n, err := syscall.EpollWait(e.ep, e.events, int(max(timeout.Milliseconds(), 1)))
	if err == syscall.EINTR {
		return nil
	}
	if err != nil {
		return os.NewSyscallError("epoll_wait", err)
	}
	for _, ev := range e.events[:n] {
		fd := int(ev.Fd)
		k, err := syscall.Read(fd, e.in)
		_ = syscall.Close(fd)
		e.open--
		each(k == 1 && err == nil && e.in[0] == echo)
	}
	return nil
}

// close closes the epoll; the caller has closed or counts what is still open.
func (e *echoes) close() { _ = syscall.Close(e.ep) }

type connRate struct {
	Workload string  `json:"workload"`
	Rate     float64 `json:"rate"` // completed connections per second
	Done     int64   `json:"done"`
	Failed   int64   `json:"failed"`
	Seconds  float64 `json:"seconds"`
}

// refusedNow is a connect that a loaded listener may answer: a full backlog
// (EAGAIN) or no listener for a moment. The Python load retries these too.
func refusedNow(err error) bool {
	return errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.ECONNREFUSED)
}

func runConns(path string, seconds float64, workers int) (*connRate, error) {
	if workers < 1 {
		return nil, errors.New("-workers must be at least 1")
	}
	conns, err := newEchoes(path)
	if err != nil {
		return nil, err
	}
	defer conns.close() // with the process's exit, the unanswered ones too
	r := &connRate{Workload: "conns"}
	// start keeps one more loop going; a send that failed ends that loop.
	start := func() error {
		for {
			err := conns.add()
			if err == nil {
				return nil
			}
			r.Failed++
			if errors.Is(err, errSendFailed) {
				return nil
			}
			if !refusedNow(err) {
				return fmt.Errorf("connect %s: %w", path, err)
			}
		}
	}
	t0 := time.Now()
	stop := t0.Add(time.Duration(seconds * float64(time.Second)))
	for range workers {
		if err := start(); err != nil {
			return nil, err
		}
	}
	var startErr error
	for conns.open > 0 && time.Since(stop) < answerGrace {
		err := conns.answers(500*time.Millisecond, func(ok bool) {
			if ok {
				r.Done++
			} else {
				r.Failed++
			}
			if startErr == nil && time.Now().Before(stop) {
				startErr = start()
			}
		})
		if err == nil {
			err = startErr
		}
		if err != nil {
			return nil, err
		}
	}
	r.Seconds = time.Since(t0).Seconds()
	r.Failed += int64(conns.open) // answers that never came
	r.Rate = float64(r.Done) / r.Seconds
	return r, nil
}

type burstResult struct {
	Workload string  `json:"workload"`
	Count    int     `json:"count"`
	Served   int     `json:"served"`
	Refused  int     `json:"refused"` // connect failed: listener backlog full or gone
	Reset    int     `json:"reset"`   // accepted, then closed or reset without an answer
	Hung     int     `json:"hung"`    // no answer within the bound
	Seconds  float64 `json:"seconds"` // until the last answer (or the bound)
}

func runBurst(path string, count int, bound float64) (*burstResult, error) {
	socks, err := newEchoes(path)
	if err != nil {
		return nil, err
	}
	defer socks.close()
	r := &burstResult{Workload: "burst", Count: count}
	t0 := time.Now()
	// Every connect first, as fast as one thread can, then the answers.
	for range count {
		switch err := socks.add(); {
		case err == nil:
		case errors.Is(err, errSendFailed):
			r.Reset++
		default:
			r.Refused++
		}
	}
	deadline := t0.Add(time.Duration(bound * float64(time.Second)))
	for socks.open > 0 && time.Now().Before(deadline) {
		err := socks.answers(min(time.Until(deadline), 500*time.Millisecond), func(ok bool) {
			if ok {
				r.Served++
			} else {
				r.Reset++
			}
		})
		if err != nil {
			return nil, err
		}
	}
	r.Hung = socks.open
	r.Seconds = time.Since(t0).Seconds()
	return r, nil
}
