//! edgewatch CLI.
fn main() {}
