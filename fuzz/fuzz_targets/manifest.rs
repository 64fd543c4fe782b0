//! What bulwark-backup reads back from object storage, where anyone with
//! write access to the bucket could have put anything: snapshot manifests,
//! verification records, object keys and the ids and times in them.

#![no_main]

use bulwark_backup::snapshot::manifest::{Manifest, VerificationRecord};
use bulwark_backup::store::layout::{self, Layout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_json("fuzz", data) {
        // Whatever parsed must serialize, round-trip and convert.
        let again = Manifest::from_json("fuzz", &m.to_json()).expect("round trip");
        assert_eq!(again.to_json(), m.to_json());
        let _ = m.to_proto(None);
    }
    if let Ok(v) = VerificationRecord::from_json("fuzz", data) {
        let _ = v.to_proto();
        let _ = v.to_result();
    }
    let text = String::from_utf8_lossy(data);
    let _ = layout::parse_time(&text);
    let _ = layout::id_time(&text);
    let _ = layout::is_valid_id(&text);
    let l = Layout::new(&object_store::path::Path::from("backups"), "lab");
    let _ = l.classify(&object_store::path::Path::from(format!("{}/{text}", l.full_dir())));
});
