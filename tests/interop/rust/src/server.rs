//! `rust-peer server`: the Echo service with the Go peer's echoServer semantics.
//!
//! The handlers copy the Go ones; what ttrpc-rust 0.8 itself does around them
//! differs from containerd/ttrpc in ways a client can see, and is left as is
//! (this peer is there to show how ttrpc-rust answers):
//! - an unknown service gets INVALID_ARGUMENT ("X service does not exist"),
//!   not UNIMPLEMENTED; an unknown method gets UNIMPLEMENTED ("X method");
//! - a stream request without FLAG_NO_DATA has its (possibly empty) payload
//!   delivered as the first message, even for a client-streaming method, so a
//!   client that opens ClientStream/Bidi with flag REMOTE_OPEN alone (Go's
//!   client does) makes the handler see one extra, empty EchoRequest
//!   (containerd/ttrpc-rust#221);
//! - a unary call past its timeout_nano ends DEADLINE_EXCEEDED "timeout";
//!   streams get no deadline.

use std::io::Write as _;
use std::os::unix::fs::FileTypeExt as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use protobuf::EnumOrUnknown;
use tokio::signal::unix::{signal, SignalKind};
use ttrpc::r#async::{
    Server, ServerStream, ServerStreamReceiver, ServerStreamSender, TtrpcContext,
};

use crate::gen::echo::{EchoRequest, EchoResponse, Pair};
use crate::gen::echo_ttrpc::{create_echo, Echo};

/// How long a SIGTERM/SIGINT shutdown waits for connections to end (as the Go
/// peer does). ttrpc-rust does not end a stream handler still waiting in
/// recv() when its client goes away, and such a handler holds its
/// connection open: shutdown then takes this long.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub async fn run(path: &str) -> Result<(), String> {
    remove_stale_socket(path)?;

    // Install the handlers before READY so a signal sent right after it is seen.
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;

    let mut server = Server::new()
        .bind(&format!("unix://{path}"))
        .map_err(|e| format!("listen on {path}: {e}"))?
        .register_service(create_echo(Arc::new(EchoServer)));
    server
        .start()
        .await
        .map_err(|e| format!("serve on {path}: {e}"))?;

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
    }

    tokio::select! {
        _ = sigterm.recv() => eprintln!("rust-peer: SIGTERM, shutting down"),
        _ = sigint.recv() => eprintln!("rust-peer: SIGINT, shutting down"),
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("rust-peer: shutdown: {e}"),
        Err(_) => eprintln!("rust-peer: shutdown: connections still open after {SHUTDOWN_GRACE:?}"),
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Removes a socket file left at path by an earlier run; refuses to remove
/// anything that is not a socket.
fn remove_stale_socket(path: &str) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("remove stale socket {path}: {e}"))
        }
        Ok(_) => Err(format!("{path} exists and is not a socket")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("stat {path}: {e}")),
    }
}

struct EchoServer;

/// The request's ttrpc metadata sorted by key, then value.
fn sorted_metadata(ctx: &TtrpcContext) -> Vec<Pair> {
    let mut pairs: Vec<Pair> = ctx
        .metadata
        .iter()
        .flat_map(|(k, vs)| {
            vs.iter().map(move |v| Pair {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            })
        })
        .collect();
    pairs.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| a.value.cmp(&b.value)));
    pairs
}

/// The status a request asks to fail with: fail_code as is (even a code the
/// ttrpc Code enum does not name), with fail_message.
fn failure(req: &EchoRequest) -> ttrpc::Result<()> {
    if req.fail_code == 0 {
        return Ok(());
    }
    let mut status = ttrpc::Status::new();
    status.code = EnumOrUnknown::from_i32(req.fail_code);
    status.message = req.fail_message.clone();
    Err(ttrpc::Error::RpcStatus(status))
}

fn response(payload: Vec<u8>, seq: i32, metadata: Vec<Pair>) -> EchoResponse {
    EchoResponse {
        payload,
        seq,
        metadata,
        ..Default::default()
    }
}

#[async_trait]
impl Echo for EchoServer {
    async fn unary(&self, ctx: &TtrpcContext, req: EchoRequest) -> ttrpc::Result<EchoResponse> {
        if req.sleep_ms > 0 {
            // The Go handler waits on its context here. ttrpc-rust enforces
            // the request's timeout_nano around unary handlers itself: it
            // drops this future and answers DEADLINE_EXCEEDED; a closed
            // connection drops it too.
            tokio::time::sleep(Duration::from_millis(req.sleep_ms as u64)).await;
        }
        failure(&req)?;
        let payload = if req.response_size > 0 {
            vec![b'x'; req.response_size as usize]
        } else {
            req.payload
        };
        Ok(response(payload, 1, sorted_metadata(ctx)))
    }

    async fn client_stream(
        &self,
        ctx: &TtrpcContext,
        mut s: ServerStreamReceiver<EchoRequest>,
    ) -> ttrpc::Result<EchoResponse> {
        let mut payload = Vec::new();
        let mut n: i32 = 0;
        let mut fail = Ok(());
        while let Some(req) = s.recv().await? {
            if n == 0 {
                fail = failure(&req);
            }
            n += 1;
            payload.extend_from_slice(&req.payload);
        }
        fail?;
        Ok(response(payload, n, sorted_metadata(ctx)))
    }

    async fn server_stream(
        &self,
        ctx: &TtrpcContext,
        req: EchoRequest,
        s: ServerStreamSender<EchoResponse>,
    ) -> ttrpc::Result<()> {
        let md = sorted_metadata(ctx);
        for seq in 1..=req.count {
            s.send(&response(req.payload.clone(), seq, md.clone()))
                .await?;
        }
        failure(&req)
    }

    async fn bidi(
        &self,
        ctx: &TtrpcContext,
        mut s: ServerStream<EchoResponse, EchoRequest>,
    ) -> ttrpc::Result<()> {
        let md = sorted_metadata(ctx);
        let mut seq: i32 = 1;
        while let Some(req) = s.recv().await? {
            failure(&req)?;
            s.send(&response(req.payload, seq, md.clone())).await?;
            seq += 1;
        }
        Ok(())
    }
}
