//! Every contract's decoder takes arbitrary bytes without a panic or an outsized allocation: records come from
//! topics anyone with access may write to. (The registry lookup in front of it is tested in `evolution`.)

use apache_avro::reader::datum::GenericDatumReader;
use edow_schemas::codec::{from_contract_value, MAX_DECODE_ALLOCATION};
use edow_schemas::contracts::{
    DeadLetter, LifecycleEvent, TaskRequested, TaskResult, WorkflowDefinition, WorkflowSignal,
    WorkflowState, WorkflowTrigger,
};
use edow_schemas::Contract;
use proptest::prelude::*;

fn decode<T: Contract>(bytes: &[u8]) {
    apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
    let reader = GenericDatumReader::builder(T::schema()).build().unwrap();
    if let Ok(value) = reader.read_value(&mut &bytes[..]) {
        let _ = from_contract_value::<T>(&value);
    }
}

fn decode_all(bytes: &[u8]) {
    decode::<WorkflowTrigger>(bytes);
    decode::<WorkflowSignal>(bytes);
    decode::<TaskRequested>(bytes);
    decode::<TaskResult>(bytes);
    decode::<LifecycleEvent>(bytes);
    decode::<WorkflowState>(bytes);
    decode::<DeadLetter>(bytes);
    decode::<WorkflowDefinition>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes);
    }

    /// Avro lengths are zig-zag varints: a large one claims gigabytes in a few bytes.
    #[test]
    fn huge_claimed_lengths_are_refused(prefix in prop::collection::vec(any::<u8>(), 0..8), len in any::<u64>()) {
        let mut bytes = prefix;
        let mut zigzag = len << 1;
        loop {
            let byte = (zigzag & 0x7f) as u8;
            zigzag >>= 7;
            if zigzag == 0 { bytes.push(byte); break; }
            bytes.push(byte | 0x80);
        }
        decode_all(&bytes);
    }
}
