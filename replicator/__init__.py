"""Odoo -> Supabase one-way CDC replicator."""
