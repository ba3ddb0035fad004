// Generates the Echo messages (rust-protobuf) and the async ttrpc service code
// from the ttrpc library's test service, ttrpc-asyncio/tests/echo/echo.proto,
// into OUT_DIR; src/main.rs include!s them from there.
// Pure Rust codegen: no protoc needed.

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let proto_dir = "../../../ttrpc-asyncio/tests/echo";
    let proto = "../../../ttrpc-asyncio/tests/echo/echo.proto";
    println!("cargo:rerun-if-changed={proto}");

    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    Codegen::new()
        .out_dir(&out_dir)
        .inputs([proto])
        .include(proto_dir)
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("ttrpc codegen of echo.proto failed");

    // The generated files carry inner attributes (#![allow(...)]), which an
    // include! inside a `mod` block rejects; declaring them as modules of an
    // included mod.rs makes rustc read them as real module files.
    std::fs::write(
        std::path::Path::new(&out_dir).join("mod.rs"),
        "pub mod echo;\npub mod echo_ttrpc;\n",
    )
    .expect("write OUT_DIR/mod.rs");
}
