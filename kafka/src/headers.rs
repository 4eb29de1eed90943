//! Reading record headers without trusting them: rdkafka's `Headers::iter`/`get` panic on a key that is not
//! UTF-8 (0.39 unwraps it), and any producer can write one. These read the native headers directly, keys
//! converted lossily.

use std::ffi::{CStr, CString};

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};

/// Headers as rdkafka hands them out, borrowed or owned.
pub trait RawHeaders {
    fn borrowed(&self) -> &BorrowedHeaders;
}

impl RawHeaders for BorrowedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self
    }
}

impl RawHeaders for OwnedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self.as_borrowed()
    }
}

fn native(headers: &BorrowedHeaders) -> *const rdsys::rd_kafka_headers_t {
    // A `&BorrowedHeaders` is the native headers pointer itself (rdkafka builds it by casting that pointer).
    headers as *const BorrowedHeaders as *const rdsys::rd_kafka_headers_t
}

/// Calls `visit` with every header in order, without copying: (key bytes, value if not null).
pub fn visit<'a, H: RawHeaders>(headers: &'a H, mut visit: impl FnMut(&'a [u8], Option<&'a [u8]>)) {
    let list = native(headers.borrowed());
    let mut idx = 0;
    loop {
        let mut name = std::ptr::null();
        let mut value = std::ptr::null();
        let mut size = 0;
        // SAFETY: `list` is the native headers list behind `headers`, borrowed for 'a; librdkafka points `name` and
        // `value` into it, valid as long as it lives.
        let err =
            unsafe { rdsys::rd_kafka_header_get_all(list, idx, &mut name, &mut value, &mut size) };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return;
        }
        let key: &'a [u8] = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value: Option<&'a [u8]> = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) });
        visit(key, value);
        idx += 1;
    }
}

/// Every header, in order: (key, converted lossily; value, if not null).
pub fn all(headers: &impl RawHeaders) -> Vec<(String, Option<Vec<u8>>)> {
    let mut all = Vec::new();
    visit(headers, |key, value| {
        all.push((
            String::from_utf8_lossy(key).into_owned(),
            value.map(<[u8]>::to_vec),
        ));
    });
    all
}

/// The value of the last header named `key`, if there is one with a value.
pub fn last(headers: &impl RawHeaders, key: &str) -> Option<Vec<u8>> {
    let headers = native(headers.borrowed());
    let key = CString::new(key).ok()?;
    let mut value = std::ptr::null();
    let mut size = 0;
    // SAFETY: as in `all`; the key is a valid C string for the call.
    let err =
        unsafe { rdsys::rd_kafka_header_get_last(headers, key.as_ptr(), &mut value, &mut size) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || value.is_null() {
        return None;
    }
    Some(unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec())
}

/// The W3C trace context in `headers`, if there is a valid one.
pub fn trace_context(
    headers: Option<&impl RawHeaders>,
) -> Option<edow_telemetry::trace::TraceContext> {
    let headers = headers?;
    let parent = last(headers, edow_telemetry::trace::TRACEPARENT);
    let state = last(headers, edow_telemetry::trace::TRACESTATE);
    edow_telemetry::trace::TraceContext::from_values(parent.as_deref(), state.as_deref())
}

#[cfg(test)]
mod tests {
    use rdkafka::bindings as rdsys;
    use rdkafka::message::BorrowedHeaders;

    #[test]
    fn a_key_that_is_not_utf8_is_read_lossily_not_panicked_on() {
        // SAFETY: a native list made and destroyed here; the borrowed view does not outlive it.
        unsafe {
            let native = rdsys::rd_kafka_headers_new(4);
            for (key, value) in [
                (&b"traceparent"[..], Some(&b"a"[..])),
                (&b"bad\xff"[..], Some(&b"b"[..])),
                (&b"empty"[..], None),
                (&b"traceparent"[..], Some(&b"c"[..])),
            ] {
                let (value, size) = match value {
                    Some(v) => (v.as_ptr() as *const std::ffi::c_void, v.len() as isize),
                    None => (std::ptr::null(), 0),
                };
                rdsys::rd_kafka_header_add(
                    native,
                    key.as_ptr() as *const _,
                    key.len() as isize,
                    value,
                    size,
                );
            }
            let headers = &*(native as *const BorrowedHeaders);
            let all = super::all(headers);
            assert_eq!(all.len(), 4);
            assert_eq!(all[1], ("bad\u{fffd}".to_string(), Some(b"b".to_vec())));
            assert_eq!(all[2], ("empty".to_string(), None));
            assert_eq!(super::last(headers, "traceparent"), Some(b"c".to_vec()));
            assert_eq!(super::last(headers, "missing"), None);
            rdsys::rd_kafka_headers_destroy(native);
        }
    }
}
