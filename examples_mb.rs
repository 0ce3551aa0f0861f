use std::time::Instant;
fn main() {
    let g = lapq::calib::Grid::U8_ASYM;
    let mut v: Vec<f32> = (0..8_000_000).map(|i| ((i % 1000) as f32) * 0.01 - 3.0).collect();
    let t = Instant::now();
    for _ in 0..5 { g.fake_quant_slice(&mut v, 0.03, 100); }
    println!("fast {:.2} ns/elem", t.elapsed().as_secs_f64() * 1e9 / 40e6);
    let t = Instant::now();
    for _ in 0..5 { for x in v.iter_mut() { *x = g.fake_quant(*x, 0.03, 100); } }
    println!("slow {:.2} ns/elem", t.elapsed().as_secs_f64() * 1e9 / 40e6);
}
