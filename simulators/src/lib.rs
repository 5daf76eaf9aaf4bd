//! edgewatch fleet simulator.
