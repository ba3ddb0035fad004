//! `rust-peer client`: drives an Echo server through the Go peer's cases
//! (same names, same assertions), less max_frame and oversize.

use std::time::{Duration, Instant};

use protobuf::{Enum as _, Message as _};
use ttrpc::context::{self, Context};
use ttrpc::r#async::Client;
use ttrpc::{Code, Error};

use crate::gen::echo::{EchoRequest, EchoResponse};
use crate::gen::echo_ttrpc::EchoClient;
use crate::ECHO_SERVICE;

const CASE_TIMEOUT: Duration = Duration::from_secs(30);

const CASES: &[&str] = &[
    "unary",
    "metadata",
    "server_stream",
    "server_stream_empty",
    "client_stream",
    "client_stream_none",
    "bidi",
    "bidi_1000",
    "deadline",
    "unimplemented_service",
    "unimplemented_method",
    "error_codes",
    "server_stream_error",
    "concurrent_100",
];

type CaseResult = Result<(), String>;

pub async fn run(path: &str, name: &str) -> Result<(), String> {
    let selected: Vec<&str> = CASES
        .iter()
        .copied()
        .filter(|c| name == "all" || name == *c)
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "unknown case {name:?}; known: all {}",
            CASES.join(" ")
        ));
    }
    let mut failed = 0;
    for case in &selected {
        match run_case(path, case).await {
            Ok(()) => println!("PASS {case}"),
            Err(e) => {
                eprintln!("FAIL {case}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} cases failed", selected.len()));
    }
    Ok(())
}

/// What a case gets: a client on its own fresh connection, the typed Echo
/// client over it, and the path to dial further connections.
struct Env {
    client: Client,
    echo: EchoClient,
    path: String,
}

fn dial(path: &str) -> Result<Client, String> {
    Client::connect(&format!("unix://{path}")).map_err(|e| format!("dial {path}: {e}"))
}

/// Runs one case on a fresh connection, bounded by CASE_TIMEOUT. Calls carry
/// no timeout_nano unless a case sets one.
async fn run_case(path: &str, name: &str) -> CaseResult {
    let client = dial(path)?;
    let env = Env {
        echo: EchoClient::new(client.clone()),
        client,
        path: path.to_string(),
    };
    let case = async {
        match name {
            "unary" => case_unary(&env).await,
            "metadata" => case_metadata(&env).await,
            "server_stream" => case_server_stream(&env).await,
            "server_stream_empty" => case_server_stream_empty(&env).await,
            "client_stream" => case_client_stream(&env).await,
            "client_stream_none" => case_client_stream_none(&env).await,
            "bidi" => case_bidi(&env).await,
            "bidi_1000" => case_bidi_1000(&env).await,
            "deadline" => case_deadline(&env).await,
            "unimplemented_service" => case_unimplemented_service(&env).await,
            "unimplemented_method" => case_unimplemented_method(&env).await,
            "error_codes" => case_error_codes(&env).await,
            "server_stream_error" => case_server_stream_error(&env).await,
            "concurrent_100" => case_concurrent_100(&env).await,
            _ => Err(format!("no such case {name:?}")),
        }
    };
    match tokio::time::timeout(CASE_TIMEOUT, case).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {CASE_TIMEOUT:?}")),
    }
}

// ---------------------------------------------------------------- helpers

fn req(payload: &[u8]) -> EchoRequest {
    EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}

fn short(b: &[u8]) -> String {
    if b.len() <= 40 {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        format!(
            "{:?}...({} bytes)",
            String::from_utf8_lossy(&b[..40]),
            b.len()
        )
    }
}

fn code_name(code: i32) -> String {
    match Code::from_i32(code) {
        Some(c) => format!("{c:?}"),
        None => format!("Code({code})"),
    }
}

/// Compares a response with the expected payload and seq.
fn check_resp(what: &str, r: &EchoResponse, payload: &[u8], seq: i32) -> CaseResult {
    if r.payload != payload {
        return Err(format!(
            "{what}: payload {}, want {}",
            short(&r.payload),
            short(payload)
        ));
    }
    if r.seq != seq {
        return Err(format!("{what}: seq {}, want {seq}", r.seq));
    }
    Ok(())
}

/// Checks that res failed with a status of the given code and, when msg is
/// not empty, message.
fn check_status<T>(what: &str, res: ttrpc::Result<T>, code: Code, msg: &str) -> CaseResult {
    let want = code as i32;
    match res {
        Ok(_) => Err(format!("{what}: no error, want {}", code_name(want))),
        Err(Error::RpcStatus(st)) => {
            let got = st.code.value();
            if got != want {
                return Err(format!(
                    "{what}: code {} ({:?}), want {}",
                    code_name(got),
                    st.message,
                    code_name(want)
                ));
            }
            if !msg.is_empty() && st.message != msg {
                return Err(format!("{what}: message {:?}, want {msg:?}", st.message));
            }
            Ok(())
        }
        Err(e) => Err(format!(
            "{what}: error {e} is not a status, want {}",
            code_name(want)
        )),
    }
}

/// Checks that a stream's next receive is its clean end (Ok(None)).
fn expect_end(what: &str, next: ttrpc::Result<Option<EchoResponse>>) -> CaseResult {
    match next {
        Ok(None) => Ok(()),
        Ok(Some(r)) => Err(format!(
            "{what}: got extra message (payload {} seq {}), want end of stream",
            short(&r.payload),
            r.seq
        )),
        Err(e) => Err(format!("{what}: got error {e}, want end of stream")),
    }
}

/// ClientStream::recv (bidi) reports the clean end as Err(Error::Eof);
/// turn it into the Option form that expect_end takes.
fn eof_as_none(r: ttrpc::Result<EchoResponse>) -> ttrpc::Result<Option<EchoResponse>> {
    match r {
        Ok(m) => Ok(Some(m)),
        Err(Error::Eof) => Ok(None),
        Err(e) => Err(e),
    }
}

fn ctx() -> Context {
    Context::default()
}

// ---------------------------------------------------------------- cases

async fn case_unary(e: &Env) -> CaseResult {
    let r = e
        .echo
        .unary(ctx(), &req(b"hello"))
        .await
        .map_err(|e| e.to_string())?;
    check_resp("unary", &r, b"hello", 1)?;
    if !r.metadata.is_empty() {
        return Err(format!("unary: metadata {:?}, want none", r.metadata));
    }
    Ok(())
}

async fn case_metadata(e: &Env) -> CaseResult {
    let mut c = ctx();
    c.add("k2".to_string(), "c".to_string());
    c.add("k1".to_string(), "b".to_string());
    c.add("k1".to_string(), "a".to_string());
    let r = e
        .echo
        .unary(c, &req(b"md"))
        .await
        .map_err(|e| e.to_string())?;
    check_resp("metadata", &r, b"md", 1)?;
    let want = [("k1", "a"), ("k1", "b"), ("k2", "c")];
    let got: Vec<(&str, &str)> = r
        .metadata
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str()))
        .collect();
    if got != want {
        return Err(format!("metadata: echoed {got:?}, want {want:?}"));
    }
    Ok(())
}

async fn case_server_stream(e: &Env) -> CaseResult {
    let mut s = e
        .echo
        .server_stream(
            ctx(),
            &EchoRequest {
                payload: b"ss".to_vec(),
                count: 5,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    for i in 1..=5 {
        let r = match s.recv().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(format!("server_stream: message {i}: end of stream")),
            Err(err) => return Err(format!("server_stream: message {i}: {err}")),
        };
        check_resp(&format!("server_stream message {i}"), &r, b"ss", i)?;
    }
    expect_end("server_stream end", s.recv().await)
}

async fn case_server_stream_empty(e: &Env) -> CaseResult {
    let mut s = e
        .echo
        .server_stream(
            ctx(),
            &EchoRequest {
                payload: b"none".to_vec(),
                count: 0,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    expect_end("server_stream_empty", s.recv().await)
}

async fn case_client_stream(e: &Env) -> CaseResult {
    let mut s = e
        .echo
        .client_stream(ctx())
        .await
        .map_err(|e| e.to_string())?;
    for p in ["a", "b", "c"] {
        s.send(&req(p.as_bytes()))
            .await
            .map_err(|e| format!("client_stream: send {p:?}: {e}"))?;
    }
    let r = s
        .close_and_recv()
        .await
        .map_err(|e| format!("client_stream: {e}"))?;
    check_resp("client_stream", &r, b"abc", 3)
}

async fn case_client_stream_none(e: &Env) -> CaseResult {
    let mut s = e
        .echo
        .client_stream(ctx())
        .await
        .map_err(|e| e.to_string())?;
    let r = s
        .close_and_recv()
        .await
        .map_err(|e| format!("client_stream_none: {e}"))?;
    check_resp("client_stream_none", &r, b"", 0)
}

async fn case_bidi(e: &Env) -> CaseResult {
    let mut s = e.echo.bidi(ctx()).await.map_err(|e| e.to_string())?;
    for i in 1..=5 {
        let p = format!("bidi-{i}").into_bytes();
        s.send(&req(&p))
            .await
            .map_err(|e| format!("bidi: send {i}: {e}"))?;
        let r = s.recv().await.map_err(|e| format!("bidi: recv {i}: {e}"))?;
        check_resp(&format!("bidi message {i}"), &r, &p, i)?;
    }
    s.close_send()
        .await
        .map_err(|e| format!("bidi: close send: {e}"))?;
    expect_end("bidi end", eof_as_none(s.recv().await))
}

async fn case_bidi_1000(e: &Env) -> CaseResult {
    const N: i32 = 1000;
    let s = e.echo.bidi(ctx()).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = s.split();
    let sender = tokio::spawn(async move {
        for i in 1..=N {
            tx.send(&req(format!("m-{i}").as_bytes()))
                .await
                .map_err(|e| format!("bidi_1000: send {i}: {e}"))?;
        }
        tx.close_send()
            .await
            .map_err(|e| format!("bidi_1000: close send: {e}"))
    });
    for i in 1..=N {
        let r = rx
            .recv()
            .await
            .map_err(|e| format!("bidi_1000: recv {i}: {e}"))?;
        check_resp(
            &format!("bidi_1000 message {i}"),
            &r,
            format!("m-{i}").as_bytes(),
            i,
        )?;
    }
    sender
        .await
        .map_err(|e| format!("bidi_1000: sender task: {e}"))??;
    expect_end("bidi_1000 end", eof_as_none(rx.recv().await))
}

async fn case_deadline(e: &Env) -> CaseResult {
    let late = EchoRequest {
        payload: b"late".to_vec(),
        sleep_ms: 5000,
        ..Default::default()
    };

    // 1. A client deadline: ttrpc-rust sends the Context's timeout_nano and
    // also gives up on its own when it passes (Error::Others "Receive packet
    // timeout"), so either side may report it.
    let start = Instant::now();
    let res = e
        .echo
        .unary(context::with_duration(Duration::from_millis(200)), &late)
        .await;
    let took = start.elapsed();
    if took >= Duration::from_secs(3) {
        return Err(format!("deadline: call took {took:?}, want < 3s"));
    }
    let local_timeout =
        matches!(&res, Err(Error::Others(m)) if m.starts_with("Receive packet timeout"));
    if !local_timeout {
        check_status(
            "deadline (client context)",
            res,
            Code::DEADLINE_EXCEEDED,
            "",
        )?;
    }

    // 2. timeout_nano alone (no client deadline): the server must end the
    // call with DEADLINE_EXCEEDED by itself. Client::request would also arm
    // a local timer of timeout_nano, so send the Request through the
    // generic stream path (neither side streaming), which waits for the
    // Response with no timer of its own. The one wire difference from a
    // unary Call: the request frame carries flag 0x1 (remote closed).
    let c = dial(&e.path)?;
    let mut request = echo_request("Unary", &late)?;
    request.timeout_nano = Duration::from_millis(200).as_nanos() as i64;
    let start = Instant::now();
    let res = match c.new_stream(request, false, false).await {
        Ok(mut inner) => inner.recv().await,
        Err(err) => Err(err),
    };
    let took = start.elapsed();
    if took >= Duration::from_secs(3) {
        return Err(format!(
            "deadline: server-side timeout took {took:?}, want < 3s"
        ));
    }
    check_status("deadline (timeout_nano)", res, Code::DEADLINE_EXCEEDED, "")?;
    drop(c);

    // 3. The first client is still usable.
    let r = e
        .echo
        .unary(ctx(), &req(b"after"))
        .await
        .map_err(|e| format!("deadline: unary after timeout: {e}"))?;
    check_resp("deadline: unary after timeout", &r, b"after", 1)
}

/// A ttrpc Request for ECHO_SERVICE's method carrying req as its payload.
fn echo_request(method: &str, req: &EchoRequest) -> Result<ttrpc::Request, String> {
    Ok(ttrpc::Request {
        service: ECHO_SERVICE.to_string(),
        method: method.to_string(),
        payload: req
            .write_to_bytes()
            .map_err(|e| format!("encode EchoRequest: {e}"))?,
        ..Default::default()
    })
}

async fn case_unimplemented_service(e: &Env) -> CaseResult {
    let mut request = echo_request("Unary", &EchoRequest::default())?;
    request.service = "no.such.Service".to_string();
    let res = e.client.request(request).await;
    check_status("unimplemented_service", res, Code::UNIMPLEMENTED, "")
}

async fn case_unimplemented_method(e: &Env) -> CaseResult {
    let request = echo_request("Nope", &EchoRequest::default())?;
    let res = e.client.request(request).await;
    check_status("unimplemented_method", res, Code::UNIMPLEMENTED, "")
}

async fn case_error_codes(e: &Env) -> CaseResult {
    // CANCELLED (1) through UNAUTHENTICATED (16).
    for code in Code::CANCELLED as i32..=Code::UNAUTHENTICATED as i32 {
        let want = Code::from_i32(code).ok_or_else(|| format!("no Code {code}"))?;
        let msg = format!("msg-{code}");
        let res = e
            .echo
            .unary(
                ctx(),
                &EchoRequest {
                    fail_code: code,
                    fail_message: msg.clone(),
                    ..Default::default()
                },
            )
            .await;
        check_status(&format!("error_codes {code}"), res, want, &msg)?;
    }
    Ok(())
}

async fn case_server_stream_error(e: &Env) -> CaseResult {
    const MSG: &str = "stream failed";
    let mut s = e
        .echo
        .server_stream(
            ctx(),
            &EchoRequest {
                payload: b"e".to_vec(),
                count: 2,
                fail_code: Code::FAILED_PRECONDITION as i32,
                fail_message: MSG.to_string(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    for i in 1..=2 {
        let r = match s.recv().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(format!("server_stream_error: message {i}: end of stream")),
            Err(err) => return Err(format!("server_stream_error: message {i}: {err}")),
        };
        check_resp(&format!("server_stream_error message {i}"), &r, b"e", i)?;
    }
    check_status(
        "server_stream_error end",
        s.recv().await,
        Code::FAILED_PRECONDITION,
        MSG,
    )
}

async fn case_concurrent_100(e: &Env) -> CaseResult {
    const N: usize = 100;
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let echo = e.echo.clone();
            tokio::spawn(async move {
                let p = format!("concurrent-{i}").into_bytes();
                match echo.unary(ctx(), &req(&p)).await {
                    Ok(r) => check_resp(&format!("concurrent_100 call {i}"), &r, &p, 1),
                    Err(err) => Err(format!("concurrent_100 call {i}: {err}")),
                }
            })
        })
        .collect();
    let mut errs = Vec::new();
    for (i, call) in calls.into_iter().enumerate() {
        match call.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => errs.push(err),
            Err(err) => errs.push(format!("concurrent_100 call {i}: task: {err}")),
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}
