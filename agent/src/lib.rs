//! edgewatch gateway agent.
