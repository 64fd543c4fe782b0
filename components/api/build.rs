//! Compiles `proto/` into Rust at build time.
//!
//! protox parses the protos in pure Rust, so a fresh machine needs no `protoc`.
//! From its output we write three things to OUT_DIR:
//! - the Rust code for every `bulwark.*` package (tonic-prost-build, client and
//!   server);
//! - `bulwark_descriptor.bin`, the encoded FileDescriptorSet (with imports and
//!   comments) that gRPC reflection serves, so grpcurl can describe every
//!   message including the google.protobuf ones;
//! - `method_access.rs`, the table of each rpc's `(bulwark.auth.v1.access)`
//!   option. The build fails if an rpc lacks one, so an unprotected method
//!   cannot be added by accident.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

/// Fully qualified name of the method option that declares who may call an rpc.
const ACCESS_OPTION: &str = "bulwark.auth.v1.access";
/// Its enum type, used to turn option values into variant names.
const ACCESS_ENUM: &str = "bulwark.auth.v1.Access";

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // Cargo scans a directory given here recursively, so adding, removing or
    // editing any proto reruns this script, and nothing else does.
    println!("cargo:rerun-if-changed={}", proto_root.display());
    println!("cargo:rerun-if-changed=build.rs");

    let mut files = Vec::new();
    find_protos(&proto_root, &proto_root, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(format!("no .proto files under {}", proto_root.display()).into());
    }

    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&files)?;

    // encode_file_descriptor_set keeps extension options (our access option),
    // which the prost_types round trip would drop.
    fs::write(
        out_dir.join("bulwark_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    fs::write(
        out_dir.join("method_access.rs"),
        method_access_table(&compiler.descriptor_pool())?,
    )?;

    // prost needs the imported google.protobuf files to resolve field types;
    // it maps them to prost_types rather than generating code for them.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// Collects every `.proto` below `dir`, as paths relative to `root` (the form
/// protox resolves imports by).
fn find_protos(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Box<dyn Error>> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            find_protos(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// Builds the Rust source of `METHOD_ACCESS`: (gRPC path, access) sorted by
/// path, so lookups can binary-search.
fn method_access_table(
    pool: &protox::prost_reflect::DescriptorPool,
) -> Result<String, Box<dyn Error>> {
    let option = pool
        .get_extension_by_name(ACCESS_OPTION)
        .ok_or_else(|| format!("extension {ACCESS_OPTION} is not defined in proto/"))?;
    let access_enum = pool
        .get_enum_by_name(ACCESS_ENUM)
        .ok_or_else(|| format!("enum {ACCESS_ENUM} is not defined in proto/"))?;

    let mut table = BTreeMap::new();
    let mut missing = Vec::new();
    for service in pool
        .services()
        .filter(|s| s.package_name().starts_with("bulwark."))
    {
        for method in service.methods() {
            let path = format!("/{}/{}", service.full_name(), method.name());
            let options = method.options();
            let number = options
                .has_extension(&option)
                .then(|| options.get_extension(&option).as_enum_number())
                .flatten()
                .unwrap_or(0);
            match access_enum.get_value(number) {
                Some(value) if number != 0 => {
                    table.insert(path, variant_name(value.name(), "ACCESS_"));
                }
                _ => missing.push(path),
            }
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "these rpcs lack a valid `option ({ACCESS_OPTION})`: {}",
            missing.join(", ")
        )
        .into());
    }

    let mut src = String::from(
        "/// Every rpc's gRPC path with the access it requires, sorted by path.\n\
         /// Generated from the `(bulwark.auth.v1.access)` option in proto/.\n\
         pub const METHOD_ACCESS: &[(&str, Access)] = &[\n",
    );
    for (path, variant) in &table {
        writeln!(src, "    ({path:?}, Access::{variant}),")?;
    }
    src.push_str("];\n");
    Ok(src)
}

/// Turns a proto enum value name into prost's Rust variant name:
/// `ACCESS_OPERATOR` -> `Operator`.
fn variant_name(value: &str, prefix: &str) -> String {
    value
        .strip_prefix(prefix)
        .unwrap_or(value)
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
            })
        })
        .collect()
}
