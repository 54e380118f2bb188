// Power theft detector: the whole environment in one resource group.
//
//   identity           user-assigned managed identity of the Function App
//   storage            data account: models (versioned, soft delete), batch-in, batch-out
//   host-storage       AzureWebJobsStorage + deployment package container (host-only rights)
//   storage-roles      least-privilege, container-scoped roles on the data account
//   monitoring         Log Analytics + Application Insights (local auth off)
//   function-app       Flex Consumption plan (FC1) + Python 3.11 Function App
//   eventgrid          Event Grid system topic on the data account (blob trigger source)
//   alerts             action group + log alerts (5xx rate, p95 latency, batch and model failures)
//
// Deployed by .github/workflows/deploy.yml (what-if, then azure/bicep-deploy); the Event Grid
// subscription is created by that workflow after the code, when the webhook key exists.
targetScope = 'resourceGroup'

@description('Azure region of every resource; must offer Flex Consumption.')
param location string = resourceGroup().location

@description('Short application name used in resource names (lowercase letters and digits).')
@minLength(2)
@maxLength(8)
param appName string = 'ptd'

@description('Stage name, part of resource names and of the unique suffix.')
@allowed([
  'dev'
  'test'
  'prod'
])
param environmentName string = 'dev'

@description('Data storage redundancy: Standard_LRS, or GRS/ZRS/GZRS for geo- or zone-redundancy.')
@allowed([
  'Standard_LRS'
  'Standard_GRS'
  'Standard_ZRS'
  'Standard_GZRS'
])
param storageSku string = 'Standard_LRS'

@description('Days before files in batch-in and batch-out (and their versions) are deleted.')
@minValue(1)
@maxValue(3650)
param batchRetentionDays int = 30

@description('Days a deleted or overwritten model blob or a deleted container can be restored.')
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 30

@description('Flex Consumption: maximum number of instances.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Flex Consumption: memory per instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Flex Consumption: concurrent HTTP invocations per instance (triggers.http.perInstanceConcurrency).')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 8

@description('Flex Consumption: always-ready instances for HTTP; 0 scales to zero (cold starts), more costs money.')
@minValue(0)
@maxValue(1000)
param alwaysReadyInstances int = 0

@description('Object id of the deployment principal (GitHub OIDC service principal): gets Blob Data Contributor on models for ptd publish. Empty: no assignment.')
param deployerPrincipalId string = ''

@description('Principal type of deployerPrincipalId.')
@allowed([
  'ServicePrincipal'
  'User'
  'Group'
])
param deployerPrincipalType string = 'ServicePrincipal'

@description('E-mail address for alerts; empty creates the action group without a receiver.')
param alertEmail string = ''

@description('Alert threshold: percent of requests answered 5xx in a 5-minute bin.')
@minValue(1)
@maxValue(100)
param http5xxPercentThreshold int = 5

@description('Alert threshold: p95 request duration in milliseconds.')
@minValue(100)
param p95LatencyThresholdMs int = 2000

@description('Days Log Analytics keeps telemetry.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

// Application settings (detector/config.py; docs/CONFIGURATION.md).
@description('PTD_MODEL_VERSION: pin a published model version; empty follows the pointer in the models container.')
param modelVersion string = ''

@description('PTD_DEFAULT_MODEL: model used when a request names none.')
@allowed([
  'lightgbm'
  'random_forest'
  'logistic_regression'
])
param defaultModel string = 'lightgbm'

@description('PTD_MAX_BATCH_RECORDS: records accepted by one POST /api/predict_batch.')
@minValue(1)
param maxBatchRecords int = 10000

@description('PTD_MAX_INVOICES_PER_CUSTOMER: invoice rows accepted per customer.')
@minValue(1)
param maxInvoicesPerCustomer int = 2000

@description('PTD_MAX_BODY_BYTES: largest request body accepted.')
@minValue(1)
param maxBodyBytes int = 52428800

@description('PTD_RATE_LIMIT_PER_MINUTE: requests per caller and minute; 0 turns the limit off.')
@minValue(0)
param rateLimitPerMinute int = 0

@description('PTD_CORS_ORIGINS: comma-separated allowlist of browser origins; empty allows none.')
param corsOrigins string = ''

@description('PTD_LOG_LEVEL: application log level.')
@allowed([
  'DEBUG'
  'INFO'
  'WARNING'
  'ERROR'
])
param logLevel string = 'INFO'

@description('Tags for every resource.')
param tags object = {}

var token = toLower(uniqueString(subscription().id, resourceGroup().id, appName, environmentName))
var allTags = union(tags, {
  application: 'power-theft-detector'
  environment: environmentName
})
var functionAppName = 'func-${appName}-${environmentName}-${token}'
var modelsContainerName = 'models'
var batchInContainerName = 'batch-in'
var batchOutContainerName = 'batch-out'
var deploymentContainerName = 'app-package'

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    location: location
    name: 'id-${appName}-${environmentName}-${token}'
    tags: allTags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    name: take('st${appName}${token}', 24)
    sku: storageSku
    modelsContainerName: modelsContainerName
    batchInContainerName: batchInContainerName
    batchOutContainerName: batchOutContainerName
    batchRetentionDays: batchRetentionDays
    softDeleteRetentionDays: softDeleteRetentionDays
    tags: allTags
  }
}

module hostStorage 'modules/host-storage.bicep' = {
  name: 'host-storage'
  params: {
    location: location
    name: take('sth${appName}${token}', 24)
    deploymentContainerName: deploymentContainerName
    principalId: identity.outputs.principalId
    tags: allTags
  }
}

module storageRoles 'modules/storage-roles.bicep' = {
  name: 'storage-roles'
  params: {
    storageAccountName: storage.outputs.name
    modelsContainerName: storage.outputs.modelsContainerName
    batchInContainerName: storage.outputs.batchInContainerName
    batchOutContainerName: storage.outputs.batchOutContainerName
    poisonQueueName: storage.outputs.poisonQueueName
    appPrincipalId: identity.outputs.principalId
    deployerPrincipalId: deployerPrincipalId
    deployerPrincipalType: deployerPrincipalType
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    logAnalyticsName: 'log-${appName}-${environmentName}-${token}'
    appInsightsName: 'appi-${appName}-${environmentName}-${token}'
    retentionInDays: logRetentionDays
    publisherPrincipalId: identity.outputs.principalId
    tags: allTags
  }
}

module functionApp 'modules/function-app.bicep' = {
  name: 'function-app'
  params: {
    location: location
    name: functionAppName
    planName: 'asp-${appName}-${environmentName}-${token}'
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    hostBlobEndpoint: hostStorage.outputs.blobEndpoint
    hostQueueEndpoint: hostStorage.outputs.queueEndpoint
    hostTableEndpoint: hostStorage.outputs.tableEndpoint
    deploymentContainerName: hostStorage.outputs.deploymentContainerName
    dataBlobEndpoint: storage.outputs.blobEndpoint
    dataQueueEndpoint: storage.outputs.queueEndpoint
    appInsightsConnectionString: monitoring.outputs.connectionString
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    alwaysReadyInstances: alwaysReadyInstances
    modelVersion: modelVersion
    modelsContainerName: modelsContainerName
    defaultModel: defaultModel
    batchInContainerName: batchInContainerName
    batchOutContainerName: batchOutContainerName
    maxBatchRecords: maxBatchRecords
    maxInvoicesPerCustomer: maxInvoicesPerCustomer
    maxBodyBytes: maxBodyBytes
    rateLimitPerMinute: rateLimitPerMinute
    corsOrigins: corsOrigins
    logLevel: logLevel
    tags: allTags
  }
  // The host starts as soon as the app exists: its identity must already hold its roles.
  dependsOn: [
    hostStorage
    storageRoles
    monitoring
  ]
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  params: {
    location: location
    name: 'evgt-${appName}-${environmentName}-${token}'
    storageAccountId: storage.outputs.id
    tags: allTags
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    location: location
    namePrefix: '${appName}-${environmentName}'
    appInsightsId: monitoring.outputs.appInsightsId
    alertEmail: alertEmail
    http5xxPercentThreshold: http5xxPercentThreshold
    p95LatencyThresholdMs: p95LatencyThresholdMs
    tags: allTags
  }
}

// Outputs read by .github/workflows/deploy.yml (tests/test_infra.py checks each one it uses).
output resourceGroup string = resourceGroup().name
output functionAppName string = functionApp.outputs.name
output functionAppUrl string = 'https://${functionApp.outputs.defaultHostName}'
output storageAccountName string = storage.outputs.name
output storageBlobEndpoint string = storage.outputs.blobEndpoint
output modelsContainerName string = storage.outputs.modelsContainerName
output batchInContainerName string = storage.outputs.batchInContainerName
output batchOutContainerName string = storage.outputs.batchOutContainerName
output eventGridSystemTopicName string = eventGrid.outputs.name
output hostStorageAccountName string = hostStorage.outputs.name
output identityClientId string = identity.outputs.clientId
output appInsightsName string = monitoring.outputs.appInsightsName
