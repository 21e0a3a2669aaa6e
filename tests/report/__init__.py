"""Tests of rfreport.report."""
