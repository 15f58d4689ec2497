"""The core: one method registry, the slot/layer protocol, targeting and model structure, adapter state,
injection as a transaction, and activation. Imports only :mod:`peftlab.util`."""
