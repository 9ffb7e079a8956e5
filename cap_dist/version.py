"""The package version, in a module of its own so that writers of outputs can stamp it without importing the
package root (which lazily exposes the engines)."""

__version__ = "0.1.0"
