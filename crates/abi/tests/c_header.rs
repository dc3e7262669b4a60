//! `include/iopf_abi.h` declares exactly the layouts and values of this crate.
//!
//! The test writes a C program that includes the header and prints, one `name value` line
//! each, the size of every structure, the offset and size of every field, every constant and a
//! few results of the header's inline helpers. It compiles that program with `cc` (or `gcc`),
//! runs it, and compares every line against the Rust side. Any single difference fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use iopf_abi::{
    ENTRIES_OFFSET, FAULT_TYPE_PAGE_REQUEST, FAULT_TYPE_UNRECOVERABLE, FLAG_NEED_WAKEUP,
    FaultReason, FaultRecord, HOST_FLAG_LIVE, HOST_FLAGS_ALL, HOST_PAGE_OFFSET, HostPageHeader,
    MAX_ENTRIES, MIN_ENTRIES, PAGE_SIZE, Pasid, Perm, PrgIndex, QueueGeometry, QueueKind,
    REGION_MAGIC, REGION_VERSION, RESPONSE_PASID_VALID, RESPONSE_VERSION, ResponseCode,
    ResponseRecord, VMM_ABI, VMM_FLAGS_ALL, VMM_PAGE_OFFSET, VmmPageHeader, page_request_flags,
    unrecoverable_flags,
};

/// Flags every C compilation of the header must pass without a diagnostic.
const STRICT_C_FLAGS: &[&str] = &[
    "-std=c11",
    "-pedantic",
    "-Wall",
    "-Wextra",
    "-Werror",
    // No structure may contain implicit padding: every byte is a declared field.
    "-Wpadded",
];

/// One line the C program prints: `name value`, where the C side computes `c_expr` and the
/// Rust side says `rust`.
struct Check {
    name: String,
    c_expr: String,
    rust: u64,
}

/// One field of a C structure and where its bytes are on the Rust side.
struct Field {
    c_struct: &'static str,
    c_member: &'static str,
    rust_offset: usize,
    rust_size: usize,
}

/// `(offset, size)` of a field of a Rust wire type.
macro_rules! rust_field {
    ($t:ty, $f:ident) => {
        (
            core::mem::offset_of!($t, $f),
            core::mem::size_of_val(&<$t>::default().$f),
        )
    };
}

fn field(c_struct: &'static str, c_member: &'static str, rust: (usize, usize)) -> Field {
    Field {
        c_struct,
        c_member,
        rust_offset: rust.0,
        rust_size: rust.1,
    }
}

/// Every field of every C structure, in declaration order, with the bytes of the Rust wire
/// type that hold the same value.
fn fields() -> Vec<Field> {
    const U64: usize = 8;
    let (reserved_off, _) = rust_field!(FaultRecord, reserved);
    vec![
        // struct iopf_host_page
        field(
            "iopf_host_page",
            "magic",
            rust_field!(HostPageHeader, magic),
        ),
        field(
            "iopf_host_page",
            "version",
            rust_field!(HostPageHeader, version),
        ),
        field("iopf_host_page", "kind", rust_field!(HostPageHeader, kind)),
        field(
            "iopf_host_page",
            "entry_size",
            rust_field!(HostPageHeader, entry_size),
        ),
        field(
            "iopf_host_page",
            "nb_entries",
            rust_field!(HostPageHeader, nb_entries),
        ),
        field(
            "iopf_host_page",
            "offset",
            rust_field!(HostPageHeader, offset),
        ),
        field(
            "iopf_host_page",
            "flags",
            rust_field!(HostPageHeader, flags),
        ),
        field("iopf_host_page", "lost", rust_field!(HostPageHeader, lost)),
        field(
            "iopf_host_page",
            "rejected",
            rust_field!(HostPageHeader, rejected),
        ),
        field(
            "iopf_host_page",
            "reserved",
            rust_field!(HostPageHeader, reserved),
        ),
        field(
            "iopf_host_page",
            "index",
            rust_field!(HostPageHeader, index),
        ),
        field("iopf_host_page", "pad", rust_field!(HostPageHeader, pad)),
        // struct iopf_vmm_page
        field("iopf_vmm_page", "abi", rust_field!(VmmPageHeader, abi)),
        field("iopf_vmm_page", "flags", rust_field!(VmmPageHeader, flags)),
        field(
            "iopf_vmm_page",
            "reserved",
            rust_field!(VmmPageHeader, reserved),
        ),
        field("iopf_vmm_page", "index", rust_field!(VmmPageHeader, index)),
        // struct iopf_fault_record, page request view (type 2)
        field(
            "iopf_fault_record",
            "type",
            rust_field!(FaultRecord, fault_type),
        ),
        field(
            "iopf_fault_record",
            "cookie",
            rust_field!(FaultRecord, cookie),
        ),
        field(
            "iopf_fault_record",
            "prm.flags",
            rust_field!(FaultRecord, word2),
        ),
        field(
            "iopf_fault_record",
            "prm.pasid",
            rust_field!(FaultRecord, word3),
        ),
        field(
            "iopf_fault_record",
            "prm.grpid",
            rust_field!(FaultRecord, word4),
        ),
        field(
            "iopf_fault_record",
            "prm.perm",
            rust_field!(FaultRecord, perm),
        ),
        field(
            "iopf_fault_record",
            "prm.addr",
            rust_field!(FaultRecord, addr),
        ),
        field(
            "iopf_fault_record",
            "prm.private_data[0]",
            rust_field!(FaultRecord, data0),
        ),
        field(
            "iopf_fault_record",
            "prm.private_data[1]",
            rust_field!(FaultRecord, data1),
        ),
        field(
            "iopf_fault_record",
            "prm.reserved",
            rust_field!(FaultRecord, reserved),
        ),
        // struct iopf_fault_record, unrecoverable view (type 1)
        field(
            "iopf_fault_record",
            "event.reason",
            rust_field!(FaultRecord, word2),
        ),
        field(
            "iopf_fault_record",
            "event.flags",
            rust_field!(FaultRecord, word3),
        ),
        field(
            "iopf_fault_record",
            "event.pasid",
            rust_field!(FaultRecord, word4),
        ),
        field(
            "iopf_fault_record",
            "event.perm",
            rust_field!(FaultRecord, perm),
        ),
        field(
            "iopf_fault_record",
            "event.addr",
            rust_field!(FaultRecord, addr),
        ),
        field(
            "iopf_fault_record",
            "event.fetch_addr",
            rust_field!(FaultRecord, data0),
        ),
        field(
            "iopf_fault_record",
            "event.reserved[0]",
            rust_field!(FaultRecord, data1),
        ),
        field(
            "iopf_fault_record",
            "event.reserved[1]",
            (reserved_off, U64),
        ),
        field("iopf_fault_record", "mark", rust_field!(FaultRecord, mark)),
        // struct iopf_response_record
        field(
            "iopf_response_record",
            "version",
            rust_field!(ResponseRecord, version),
        ),
        field(
            "iopf_response_record",
            "flags",
            rust_field!(ResponseRecord, flags),
        ),
        field(
            "iopf_response_record",
            "pasid",
            rust_field!(ResponseRecord, pasid),
        ),
        field(
            "iopf_response_record",
            "grpid",
            rust_field!(ResponseRecord, grpid),
        ),
        field(
            "iopf_response_record",
            "code",
            rust_field!(ResponseRecord, code),
        ),
        field(
            "iopf_response_record",
            "cookie",
            rust_field!(ResponseRecord, cookie),
        ),
        field(
            "iopf_response_record",
            "mark",
            rust_field!(ResponseRecord, mark),
        ),
    ]
}

/// Every C structure and the size of the Rust wire type with the same layout.
fn structs() -> Vec<(&'static str, usize)> {
    use core::mem::size_of;
    vec![
        ("iopf_host_page", size_of::<HostPageHeader>()),
        ("iopf_vmm_page", size_of::<VmmPageHeader>()),
        ("iopf_fault_record", size_of::<FaultRecord>()),
        ("iopf_response_record", size_of::<ResponseRecord>()),
    ]
}

/// Every `#define` of the header with the Rust value it must equal.
fn constants() -> Vec<(&'static str, u64)> {
    use page_request_flags as prf;
    use unrecoverable_flags as urf;
    let reason = |r: FaultReason| u64::from(r as u32);
    let code = |c: ResponseCode| u64::from(c as u32);
    vec![
        ("IOPF_REGION_MAGIC", REGION_MAGIC.into()),
        ("IOPF_REGION_VERSION", REGION_VERSION.into()),
        ("IOPF_QUEUE_KIND_FAULT", (QueueKind::Fault as u16).into()),
        (
            "IOPF_QUEUE_KIND_RESPONSE",
            (QueueKind::Response as u16).into(),
        ),
        (
            "IOPF_FAULT_ENTRY_SIZE",
            QueueKind::Fault.entry_size().into(),
        ),
        (
            "IOPF_RESPONSE_ENTRY_SIZE",
            QueueKind::Response.entry_size().into(),
        ),
        ("IOPF_PAGE_SIZE", PAGE_SIZE.into()),
        ("IOPF_HOST_PAGE_OFFSET", HOST_PAGE_OFFSET.into()),
        ("IOPF_VMM_PAGE_OFFSET", VMM_PAGE_OFFSET.into()),
        ("IOPF_ENTRIES_OFFSET", ENTRIES_OFFSET.into()),
        ("IOPF_MIN_ENTRIES", MIN_ENTRIES.into()),
        ("IOPF_MAX_ENTRIES", MAX_ENTRIES.into()),
        ("IOPF_HOST_FLAG_LIVE", HOST_FLAG_LIVE.into()),
        ("IOPF_FLAG_NEED_WAKEUP", FLAG_NEED_WAKEUP.into()),
        ("IOPF_HOST_FLAGS_ALL", HOST_FLAGS_ALL.into()),
        ("IOPF_VMM_FLAGS_ALL", VMM_FLAGS_ALL.into()),
        ("IOPF_VMM_ABI", VMM_ABI.into()),
        ("IOPF_INDEX_OFFSET", iopf_abi::INDEX_OFFSET.into()),
        ("IOPF_MARK_VALID", iopf_abi::MARK_VALID),
        (
            "IOPF_FAULT_TYPE_UNRECOVERABLE",
            FAULT_TYPE_UNRECOVERABLE.into(),
        ),
        (
            "IOPF_FAULT_TYPE_PAGE_REQUEST",
            FAULT_TYPE_PAGE_REQUEST.into(),
        ),
        ("IOPF_FAULT_REASON_UNKNOWN", reason(FaultReason::Unknown)),
        (
            "IOPF_FAULT_REASON_PASID_FETCH",
            reason(FaultReason::PasidFetch),
        ),
        (
            "IOPF_FAULT_REASON_BAD_PASID_ENTRY",
            reason(FaultReason::BadPasidEntry),
        ),
        (
            "IOPF_FAULT_REASON_PASID_INVALID",
            reason(FaultReason::PasidInvalid),
        ),
        (
            "IOPF_FAULT_REASON_WALK_EABT",
            reason(FaultReason::WalkExternalAbort),
        ),
        ("IOPF_FAULT_REASON_PTE_FETCH", reason(FaultReason::PteFetch)),
        (
            "IOPF_FAULT_REASON_PERMISSION",
            reason(FaultReason::Permission),
        ),
        ("IOPF_FAULT_REASON_ACCESS", reason(FaultReason::Access)),
        (
            "IOPF_FAULT_REASON_OOR_ADDRESS",
            reason(FaultReason::OutOfRangeAddress),
        ),
        ("IOPF_FAULT_PERM_READ", Perm::READ.bits().into()),
        ("IOPF_FAULT_PERM_WRITE", Perm::WRITE.bits().into()),
        ("IOPF_FAULT_PERM_EXEC", Perm::EXEC.bits().into()),
        ("IOPF_FAULT_PERM_PRIV", Perm::PRIV.bits().into()),
        ("IOPF_FAULT_PERM_ALL", Perm::all().bits().into()),
        ("IOPF_PAGE_REQUEST_PASID_VALID", prf::PASID_VALID.into()),
        ("IOPF_PAGE_REQUEST_LAST_PAGE", prf::LAST_PAGE.into()),
        ("IOPF_PAGE_REQUEST_PRIV_DATA", prf::PRIV_DATA.into()),
        ("IOPF_PAGE_REQUEST_FLAGS_ALL", prf::ALL.into()),
        ("IOPF_UNRECOV_PASID_VALID", urf::PASID_VALID.into()),
        ("IOPF_UNRECOV_ADDR_VALID", urf::ADDR_VALID.into()),
        (
            "IOPF_UNRECOV_FETCH_ADDR_VALID",
            urf::FETCH_ADDR_VALID.into(),
        ),
        ("IOPF_UNRECOV_FLAGS_ALL", urf::ALL.into()),
        ("IOPF_PASID_MAX", Pasid::MAX.into()),
        ("IOPF_PRG_INDEX_MAX", PrgIndex::MAX.into()),
        ("IOPF_RESPONSE_VERSION", RESPONSE_VERSION.into()),
        ("IOPF_RESPONSE_PASID_VALID", RESPONSE_PASID_VALID.into()),
        ("IOPF_RESPONSE_SUCCESS", code(ResponseCode::Success)),
        ("IOPF_RESPONSE_INVALID", code(ResponseCode::Invalid)),
        ("IOPF_RESPONSE_FAILURE", code(ResponseCode::Failure)),
    ]
}

/// Calls of the header's inline helpers, against [`QueueGeometry`].
fn helper_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    for kind in [QueueKind::Fault, QueueKind::Response] {
        for nb in [MIN_ENTRIES, 64, MAX_ENTRIES] {
            let g = QueueGeometry::new(kind, nb).unwrap();
            let size = g.entry_size();
            checks.push(Check {
                name: format!("iopf_region_len({size}, {nb})"),
                c_expr: format!("iopf_region_len({size}u, {nb}u)"),
                rust: g.region_len(),
            });
            let indices = BTreeSet::from([0, 1, nb - 1, nb, nb + 1, u32::MAX - 1, u32::MAX]);
            for index in indices {
                checks.push(Check {
                    name: format!("iopf_entry_offset({size}, {nb}, {index})"),
                    c_expr: format!("iopf_entry_offset({size}u, {nb}u, {index}u)"),
                    rust: g.entry_offset(index),
                });
            }
        }
    }
    for index in [0, 1, 0x8000_0000, u32::MAX] {
        checks.push(Check {
            name: format!("IOPF_MARK({index})"),
            c_expr: format!("IOPF_MARK({index}u)"),
            rust: iopf_abi::mark(index),
        });
    }
    checks
}

fn all_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    for (name, size) in structs() {
        checks.push(Check {
            name: format!("sizeof struct {name}"),
            c_expr: format!("sizeof(struct {name})"),
            rust: size as u64,
        });
    }
    for f in fields() {
        let (s, m) = (f.c_struct, f.c_member);
        checks.push(Check {
            name: format!("offsetof struct {s} {m}"),
            c_expr: format!("offsetof(struct {s}, {m})"),
            rust: f.rust_offset as u64,
        });
        checks.push(Check {
            name: format!("sizeof struct {s} {m}"),
            c_expr: format!("sizeof(((struct {s} *)0)->{m})"),
            rust: f.rust_size as u64,
        });
    }
    for (name, value) in constants() {
        checks.push(Check {
            name: name.to_owned(),
            c_expr: name.to_owned(),
            rust: value,
        });
    }
    checks.extend(helper_checks());
    checks
}

fn header_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include")
}

fn header_text() -> String {
    let path = header_dir().join("iopf_abi.h");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "iopf-abi-{tag}-{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first of `candidates` that runs (`--version` exits 0).
fn find_compiler(candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|cc| {
            Command::new(cc)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|cc| (*cc).to_owned())
}

/// `$CC`, else `cc`, else `gcc`; fails the test with an install hint if none runs.
fn c_compiler() -> String {
    let from_env = std::env::var("CC").ok().filter(|cc| !cc.is_empty());
    let mut candidates: Vec<&str> = from_env.iter().map(String::as_str).collect();
    candidates.extend(["cc", "gcc"]);
    find_compiler(&candidates).unwrap_or_else(|| {
        panic!(
            "no C compiler found (tried $CC, cc, gcc): this test checks include/iopf_abi.h \
             against the Rust layouts and needs one; install gcc (e.g. `apt-get install gcc`)"
        )
    })
}

/// Runs `cmd`, failing the test with its output unless it exits 0; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    String::from_utf8(out.stdout).expect("compiler or program printed non-UTF-8")
}

fn c_program(checks: &[Check]) -> String {
    let mut src = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"iopf_abi.h\"\n\nint main(void)\n{\n",
    );
    for c in checks {
        src.push_str(&format!(
            "\tprintf(\"%s %llu\\n\", \"{}\", (unsigned long long)({}));\n",
            c.name, c.c_expr
        ));
    }
    src.push_str("\treturn 0;\n}\n");
    src
}

#[test]
fn header_agrees_with_rust_on_every_size_offset_and_constant() {
    let checks = all_checks();
    let mut names = BTreeSet::new();
    for c in &checks {
        assert!(names.insert(c.name.as_str()), "duplicate check {}", c.name);
    }

    let dir = TempDir::new("c-header");
    let src = dir.0.join("layout.c");
    let exe = dir.0.join("layout");
    std::fs::write(&src, c_program(&checks)).unwrap();
    run(Command::new(c_compiler())
        .args(STRICT_C_FLAGS)
        .arg("-I")
        .arg(header_dir())
        .arg("-o")
        .arg(&exe)
        .arg(&src));
    let stdout = run(&mut Command::new(&exe));

    let mut c_side = BTreeMap::new();
    for line in stdout.lines() {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed line {line:?}"));
        let value: u64 = value
            .parse()
            .unwrap_or_else(|e| panic!("line {line:?}: {e}"));
        assert!(
            c_side.insert(name.to_owned(), value).is_none(),
            "C printed {name} twice"
        );
    }
    assert_eq!(c_side.len(), checks.len(), "C printed a line per check");

    let mismatches: Vec<String> = checks
        .iter()
        .filter_map(|c| match c_side.get(&c.name) {
            Some(&v) if v == c.rust => None,
            Some(&v) => Some(format!("{}: C {v}, Rust {}", c.name, c.rust)),
            None => Some(format!("{}: C printed nothing", c.name)),
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "include/iopf_abi.h disagrees with iopf-abi:\n{}",
        mismatches.join("\n")
    );
}

/// The field list the C program checks is complete: each structure's fields (each fault view
/// on its own) tile it with no gap and no overlap, so no byte goes unchecked.
#[test]
fn checked_fields_cover_every_byte_of_every_structure() {
    for (name, size) in structs() {
        let views: &[&str] = if name == "iopf_fault_record" {
            &["prm.", "event."]
        } else {
            &[""]
        };
        for view in views {
            let mut spans: Vec<(usize, usize, &str)> = fields()
                .into_iter()
                .filter(|f| f.c_struct == name)
                .filter(|f| f.c_member.starts_with(view) || !f.c_member.contains('.'))
                .map(|f| (f.rust_offset, f.rust_size, f.c_member))
                .collect();
            spans.sort();
            let mut end = 0;
            for (offset, len, member) in spans {
                assert_eq!(offset, end, "{name} {view}: {member} does not follow on");
                end = offset + len;
            }
            assert_eq!(end, size, "{name} {view}: fields stop short of the end");
        }
    }
}

/// Every value the header defines is one the C program checks.
#[test]
fn every_header_constant_is_checked() {
    let checked: BTreeSet<&str> = constants().into_iter().map(|(n, _)| n).collect();
    let mut defined = BTreeSet::new();
    for line in header_text().lines() {
        let Some(rest) = line.trim_start().strip_prefix("#define ") else {
            continue;
        };
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let (name, after) = rest.split_at(name_len);
        // The include guard has no value; function-like macros are not ABI values.
        if name == "IOPF_ABI_H" || after.starts_with('(') {
            continue;
        }
        defined.insert(name.to_owned());
    }
    let unchecked: Vec<&String> = defined
        .iter()
        .filter(|n| !checked.contains(n.as_str()))
        .collect();
    assert!(
        unchecked.is_empty(),
        "header constants no check covers: {unchecked:?}"
    );
}

#[test]
fn header_compiles_cleanly_as_strict_c11_and_twice_in_one_unit() {
    let dir = TempDir::new("c-strict");
    let src = dir.0.join("twice.c");
    std::fs::write(
        &src,
        "#include \"iopf_abi.h\"\n#include \"iopf_abi.h\"\n\
         struct iopf_fault_record iopf_check_record;\n",
    )
    .unwrap();
    run(Command::new(c_compiler())
        .args(STRICT_C_FLAGS)
        .arg("-I")
        .arg(header_dir())
        .arg("-c")
        .arg("-o")
        .arg(dir.0.join("twice.o"))
        .arg(&src));
}

#[test]
fn header_compiles_cleanly_as_cpp11_with_c_linkage() {
    let from_env = std::env::var("CXX").ok().filter(|cxx| !cxx.is_empty());
    let mut candidates: Vec<&str> = from_env.iter().map(String::as_str).collect();
    candidates.extend(["c++", "g++", "clang++"]);
    let Some(cxx) = find_compiler(&candidates) else {
        // The C checks above are the contract; C++ is a convenience, checked where a C++
        // compiler is installed (`apt-get install g++`).
        eprintln!("note: no C++ compiler (tried $CXX, c++, g++, clang++): C++ check not run");
        return;
    };
    let dir = TempDir::new("cxx");
    let src = dir.0.join("linkage.cpp");
    std::fs::write(
        &src,
        "#include \"iopf_abi.h\"\n\
         static_assert(sizeof(iopf_fault_record) == IOPF_FAULT_ENTRY_SIZE, \"record\");\n\
         int main() { iopf_fault_record r = {}; r.prm.grpid = 1; return (int)r.event.pasid - 1; }\n",
    )
    .unwrap();
    run(Command::new(cxx)
        .args(["-std=c++11", "-pedantic", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(header_dir())
        .arg("-fsyntax-only")
        .arg(&src));
}
