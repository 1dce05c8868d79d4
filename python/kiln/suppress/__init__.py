"""Suppression: addresses kiln must never send to, their import and export formats."""
