fn main() {
    let p = std::env::args().nth(1).unwrap();
    let d = std::fs::read(p).unwrap();
    for op in veil_fuzz::datagram::decode(&d) { eprintln!("{op:?}"); }
    println!("{:?}", veil_fuzz::datagram::run(&d));
}
