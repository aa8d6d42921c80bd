"""Labeled DESTs made into what trainers, annotation tools and reviewers read: exports, reports."""
