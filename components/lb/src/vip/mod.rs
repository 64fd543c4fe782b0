//! The virtual IP: who holds it ([`fence`]) and how it is taken and given
//! up (bind or arp mode).

pub mod fence;
