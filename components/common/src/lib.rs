//! What every bulwark daemon shares.
