//! edgewatch aggregator.
