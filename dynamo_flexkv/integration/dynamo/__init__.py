"""Dynamo adapter: router-visible KV events and the legacy worker launcher."""
