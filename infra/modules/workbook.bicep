// The operators' dashboard as an Azure Monitor workbook on Application Insights: requests,
// latency, errors, batch files and rows, flagged share, model version, cold starts. The panels
// (workbook.json) query the requests table and the app's metrics (customMetrics, names from
// detector/telemetry.py; tests/test_infra.py checks that each one exists).
// https://learn.microsoft.com/azure/azure-monitor/visualize/workbooks-automate
@description('Azure region.')
param location string

@description('Display name of the workbook.')
param displayName string

@description('Resource id of Application Insights (the workbook\'s data source).')
param appInsightsId string

@description('Tags for every resource.')
param tags object = {}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appInsightsId, 'ptd-operations-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    sourceId: appInsightsId
    version: '1.0'
    serializedData: loadTextContent('workbook.json')
  }
}

output id string = workbook.id
