//! The proxy-wasm ABI's byte formats, host side: header maps (the SDK's `serialize_map`) and
//! property paths (parts joined by NUL).

/// A header map as the SDK serializes it: `u32` count, then per pair `u32` key length and
/// `u32` value length, then each key and value followed by a NUL byte (all little endian).
pub fn serialize_map(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        4 + pairs
            .iter()
            .map(|(k, v)| 10 + k.len() + v.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// The inverse of [`serialize_map`]; `None` when the bytes are malformed.
pub fn deserialize_map(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = word(0)?;
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        sizes.push((word(4 + 8 * i)?, word(8 + 8 * i)?));
    }
    let mut p = 4 + 8 * n;
    let mut out = Vec::with_capacity(n);
    for (ks, vs) in sizes {
        let k = bytes.get(p..p + ks)?;
        p += ks + 1;
        let v = bytes.get(p..p + vs)?;
        p += vs + 1;
        out.push((String::from_utf8(k.to_vec()).ok()?, v.to_vec()));
    }
    Some(out)
}

/// A property path as the SDK sends it (`["xds", "cluster_name"]` → `xds\0cluster_name`),
/// rendered the way tests name properties: `xds.cluster_name`.
pub fn property_path(bytes: &[u8]) -> String {
    bytes
        .split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip() {
        let pairs = vec![
            (":authority".to_string(), b"a.example.com".to_vec()),
            ("empty".to_string(), Vec::new()),
        ];
        assert_eq!(deserialize_map(&serialize_map(&pairs)), Some(pairs));
    }

    #[test]
    fn map_empty_and_truncated() {
        assert_eq!(deserialize_map(&[]), Some(Vec::new()));
        assert_eq!(deserialize_map(&[0, 0, 0, 0]), Some(Vec::new()));
        assert_eq!(deserialize_map(&[1, 0, 0, 0, 5, 0]), None);
    }

    #[test]
    fn path_joins_parts_with_dots() {
        assert_eq!(property_path(b"xds\0cluster_name"), "xds.cluster_name");
        assert_eq!(property_path(b"plugin_root_id"), "plugin_root_id");
    }
}
