"""Tests of rfreport.analysis."""
