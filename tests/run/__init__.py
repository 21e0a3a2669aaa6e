"""Tests of rfreport.run."""
