"""meter.label"""
