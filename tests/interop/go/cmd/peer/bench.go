package main

// peer bench: load generator for the ttrpc benchmark (bench/ttrpc_bench.py).
//
//	peer bench --dial unix:/abs/path.sock --kind unary|bidi --seconds N --concurrency C
//
// It drives any server of the Echo service and prints one JSON line:
//
//	unary: {"calls": n, "seconds": s, "p50_us": x, "p99_us": y}
//	bidi:  {"messages": n, "seconds": s}
//
// Unary: C workers share one connection, each making sequential Unary calls
// with a 16-byte payload (no timeout); latencies are per call. Bidi: one
// stream, a sender goroutine sends 16-byte messages as fast as it can while
// the receiver counts the echoes that arrive within the window, then the
// sending side is closed and the remaining echoes drained. Both first run
// for benchWarmup without counting.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/ttrpc"

	"github.com/socketforward/socketforward/tests/interop/go/echopb"
	"github.com/socketforward/socketforward/tests/interop/go/internal/standin"
)

const (
	benchPayloadSize = 16
	benchWarmup      = 200 * time.Millisecond
	// benchGrace bounds how long a run may overrun its window before the
	// bench gives up on a stuck server.
	benchGrace = 60 * time.Second
)

type unaryResult struct {
	Calls   int     `json:"calls"`
	Seconds float64 `json:"seconds"`
	P50us   float64 `json:"p50_us"`
	P99us   float64 `json:"p99_us"`
}

type bidiResult struct {
	Messages int     `json:"messages"`
	Seconds  float64 `json:"seconds"`
}

func benchMain(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	dial := fs.String("dial", "", "unix:/abs/path.sock to connect to")
	kind := fs.String("kind", "unary", "workload: unary or bidi")
	seconds := fs.Float64("seconds", 3, "length of the measured window")
	concurrency := fs.Int("concurrency", 1, "unary workers sharing the connection")
	_ = fs.Parse(args)
	path, err := standin.UnixPath(*dial)
	if err != nil {
		return err
	}
	if *seconds <= 0 || *concurrency < 1 {
		return fmt.Errorf("want --seconds > 0 and --concurrency >= 1")
	}
	window := time.Duration(*seconds * float64(time.Second))

	conn, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	echo := echopb.NewEchoClient(c)

	// Cancelled, never given a deadline: calls carry no timeout_nano.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watchdog := time.AfterFunc(benchWarmup+window+benchGrace, cancel)
	defer watchdog.Stop()

	var result any
	switch *kind {
	case "unary":
		if _, err := benchUnary(ctx, echo, *concurrency, benchWarmup); err != nil {
			return fmt.Errorf("warmup: %w", err)
		}
		result, err = benchUnary(ctx, echo, *concurrency, window)
	case "bidi":
		result, err = benchBidi(ctx, echo, window)
	default:
		return fmt.Errorf("unknown --kind %q: want unary or bidi", *kind)
	}
	if err != nil {
		return err
	}
	line, err := json.Marshal(result)
	if err != nil {
		return err
	}
	fmt.Println(string(line))
	return nil
}

// benchUnary runs concurrency workers of sequential Unary calls for window.
func benchUnary(ctx context.Context, echo echopb.EchoClient, concurrency int, window time.Duration) (unaryResult, error) {
	payload := bytes.Repeat([]byte{'b'}, benchPayloadSize)
	latencies := make([][]time.Duration, concurrency)
	errs := make([]error, concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(window)
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := &echopb.EchoRequest{Payload: payload}
			mine := make([]time.Duration, 0, 1<<14)
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				r, err := echo.Unary(ctx, req)
				if err != nil {
					errs[w] = fmt.Errorf("worker %d: unary: %w", w, err)
					return
				}
				mine = append(mine, time.Since(t0))
				if len(r.Payload) != benchPayloadSize {
					errs[w] = fmt.Errorf("worker %d: echoed %d bytes, want %d", w, len(r.Payload), benchPayloadSize)
					return
				}
			}
			latencies[w] = mine
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return unaryResult{}, err
	}
	all := slices.Concat(latencies...)
	slices.Sort(all)
	return unaryResult{
		Calls:   len(all),
		Seconds: elapsed.Seconds(),
		P50us:   percentileMicros(all, 0.50),
		P99us:   percentileMicros(all, 0.99),
	}, nil
}

// percentileMicros is the nearest-rank percentile of sorted, in microseconds.
func percentileMicros(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := max(int(math.Ceil(p*float64(len(sorted))))-1, 0)
	return float64(sorted[i].Nanoseconds()) / 1e3
}

// benchBidi streams on one Bidi call: messages echoed within window, counted
// from the first echo after the warmup.
func benchBidi(ctx context.Context, echo echopb.EchoClient, window time.Duration) (bidiResult, error) {
	s, err := echo.Bidi(ctx)
	if err != nil {
		return bidiResult{}, err
	}
	var stop atomic.Bool
	sendDone := make(chan error, 1)
	go func() {
		req := &echopb.EchoRequest{Payload: bytes.Repeat([]byte{'b'}, benchPayloadSize)}
		for !stop.Load() {
			if err := s.Send(req); err != nil {
				sendDone <- fmt.Errorf("bidi send: %w", err)
				return
			}
		}
		sendDone <- s.CloseSend()
	}()
	defer stop.Store(true)

	warmEnd := time.Now().Add(benchWarmup)
	var (
		counting   bool
		messages   int
		start, now time.Time
	)
	for {
		r, err := s.Recv()
		if err != nil {
			return bidiResult{}, fmt.Errorf("bidi recv: %w", err)
		}
		if len(r.Payload) != benchPayloadSize {
			return bidiResult{}, fmt.Errorf("bidi: echoed %d bytes, want %d", len(r.Payload), benchPayloadSize)
		}
		now = time.Now()
		if !counting {
			if now.Before(warmEnd) {
				continue
			}
			counting, start = true, now
			continue
		}
		messages++
		if now.Sub(start) >= window {
			break
		}
	}
	stop.Store(true)
	for {
		_, err := s.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return bidiResult{}, fmt.Errorf("bidi drain: %w", err)
		}
	}
	if err := <-sendDone; err != nil {
		return bidiResult{}, err
	}
	return bidiResult{Messages: messages, Seconds: now.Sub(start).Seconds()}, nil
}
