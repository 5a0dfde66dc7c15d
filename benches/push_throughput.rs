//! Push throughput into mock APNs and FCM servers (filled in below).
fn main() {}
